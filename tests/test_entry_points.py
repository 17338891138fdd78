"""End to end through the real command lines: train, generate, evaluate, and their bad inputs."""

import json
import os
import re
import socket
import subprocess
import sys

import imageio.v3 as iio
import pytest
from PIL import Image

from sora_jax import generate
from tests.helpers import laptop_env, tiny_data_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, check=True):
    result = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=laptop_env(),
                            capture_output=True, text=True, timeout=600)
    if check and result.returncode:
        raise AssertionError(f"{args} failed:\n{result.stdout}\n{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("e2e"))
    run("sora_jax.train", "--config=configs/moving_shapes.py:runlocal,pixels",
        f"--config.data.data_dir={tiny_data_dir()}", f"--workdir={workdir}")
    return workdir


def test_training_writes_checkpoints_config_metrics_and_samples(workdir):
    assert os.path.exists(os.path.join(workdir, "config.json"))
    assert os.listdir(os.path.join(workdir, "checkpoints"))
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    assert os.listdir(os.path.join(workdir, "samples"))
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    keys = set().union(*rows)
    assert {"loss", "grad_norm", "learning_rate", "steps_per_s", "tokens_per_s", "tflops_per_s",
            "mfu", "val/loss_t0.1", "val/loss_t0.9"} <= keys


def test_generate_writes_mp4_and_png_grid_from_prompts(workdir, tmp_path):
    mp4 = str(tmp_path / "out.mp4")
    result = run("sora_jax.generate", f"--workdir={workdir}", "--prompt=scarlet ball going west",
                 "--prompt=a blue circle moving up", "--num_samples=2", "--steps=3", f"--out={mp4}",
                 "--negative_prompt=a green square", "--guidance_rescale=0.5",
                 "--guidance_interval=0.2,0.9", "--expand_prompt=moving_shapes")
    frames = iio.imread(mp4)
    assert frames.shape[0] == 5 and frames.shape[-1] == 3  # the tiny config's 5 frames
    assert "Expanded prompt 'scarlet ball going west' -> " in result.stderr
    png = str(tmp_path / "grid.png")
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    result = run("sora_jax.generate", f"--workdir={workdir}", "--prompt=a green triangle",
                 "--steps=2", "--frames=9", "--height=24", "--width=32", f"--out={png}",
                 f"--expand_prompt={url}")
    width, height = Image.open(png).size
    assert (width, height) == (32 * 4, 9 * 24 * 4 + 8 * 2)  # frames stacked, enlarged 4x
    assert url in result.stderr and "original prompts" in result.stderr  # expansion failed, kept


def test_generate_extends_a_video_and_evaluate_measures_extension(workdir, tmp_path):
    clip = (iio.imread(os.path.join(workdir, "samples", sorted(os.listdir(
        os.path.join(workdir, "samples")))[-1]), index=None))  # a training sample, as a prompt
    source = str(tmp_path / "clip.gif")
    iio.imwrite(source, clip[:, :16, :16], extension=".gif")  # one video of the sample grid
    out = str(tmp_path / "longer.gif")
    run("sora_jax.generate", f"--workdir={workdir}", "--prompt=a red square moving left",
        f"--video={source}", "--extend=backward", "--frames=11", "--steps=2", f"--out={out}")
    assert iio.imread(out, index=None).shape[0] == 11
    result = run("sora_jax.evaluate", f"--workdir={workdir}", "--prompting=extend_forward",
                 "--num_prompts=2", "--steps=2", "--frames=9")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["task"] == "extend_forward" and report["frames"] == 9
    assert report["generated_frames"] == 4 and report["seams"] == [5, 7]
    assert report["given_psnr"] > 40  # pixel space: given frames are kept as they are
    assert report["seam_ratio"] > 0 and 0 <= report["adherence"]["coherent_frame_rate"] <= 1


def test_evaluate_prints_prompt_adherence_json(workdir):
    result = run("sora_jax.evaluate", f"--workdir={workdir}", "--num_prompts=4", "--steps=2",
                 "--rephrase=word_order", "--expand_prompt=moving_shapes")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["phrasing"] == "word_order" and report["expand_prompt"] == "moving_shapes"
    for key in ("colour_accuracy", "shape_accuracy", "direction_accuracy", "coherent_frame_rate"):
        assert 0.0 <= report[key] <= 1.0
    assert report["num_prompts"] == 4
    assert report["detector_on_real_videos"]["colour_accuracy"] == 1.0


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompts=[" "]), "must be non-empty"),
    (dict(out="/proc/forbidden/x.mp4"), "Cannot write"),
    (dict(out="video.avi"), "extension must be one of"),
    (dict(height=18), "18"),
    (dict(prompts=["a", "b"], negative_prompts=["x", "y", "z"]), "one per --prompt (2), not 3"),
    (dict(guidance_rescale=2.0), "rescale must be in [0, 1], got 2.0"),
    (dict(extend="forward", frames=12), "--extend needs the clip"),
    (dict(image="/nonexistent.png"), "does not exist"),
])
def test_generate_rejects_bad_input_with_a_clear_message(workdir, tmp_path, kwargs, message):
    kwargs = dict(prompts=["a red square"], out=str(tmp_path / "x.gif")) | kwargs
    with pytest.raises(ValueError, match=re.escape(message)):
        generate.generate(workdir, kwargs.pop("prompts"), kwargs.pop("out"), **kwargs)
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("args, message", [
    (["--guidance_interval=0.5"], "--guidance_interval must be 'lo,hi'"),
    (["--extend=forward", "--frames=12"], "--extend needs the clip"),
])
def test_generate_command_line_reports_bad_input(workdir, tmp_path, args, message):
    result = run("sora_jax.generate", f"--workdir={workdir}", "--prompt=a red square",
                 f"--out={tmp_path}/x.gif", *args, check=False)
    assert result.returncode != 0
    assert message in result.stderr


def test_train_rejects_unknown_config_key():
    result = run("sora_jax.train", "--config=configs/moving_shapes.py:runlocal,pixels",
                 "--config.model.widht=3", "--workdir=/tmp/unused", check=False)
    assert result.returncode != 0
    assert "widht" in result.stderr
