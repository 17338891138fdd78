"""End to end through the real command lines: train, generate, evaluate, and their bad inputs."""

import json
import os
import subprocess
import sys

import imageio.v3 as iio
import pytest
from PIL import Image

from tests.helpers import tiny_data_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, check=True):
    result = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
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
    run("sora_jax.generate", f"--workdir={workdir}", "--prompt=a red square slides to the left",
        "--prompt=a blue circle moving up", "--num_samples=2", "--steps=3", f"--out={mp4}")
    frames = iio.imread(mp4)
    assert frames.shape[0] == 5 and frames.shape[-1] == 3  # the tiny config's 5 frames
    png = str(tmp_path / "grid.png")
    run("sora_jax.generate", f"--workdir={workdir}", "--prompt=a green triangle", "--steps=2",
        "--frames=9", "--height=24", "--width=32", f"--out={png}")
    width, height = Image.open(png).size
    assert (width, height) == (32 * 4, 9 * 24 * 4 + 8 * 2)  # frames stacked, enlarged 4x


def test_evaluate_prints_prompt_adherence_json(workdir):
    result = run("sora_jax.evaluate", f"--workdir={workdir}", "--num_prompts=4", "--steps=2")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("colour_accuracy", "shape_accuracy", "direction_accuracy", "coherent_frame_rate"):
        assert 0.0 <= report[key] <= 1.0
    assert report["num_prompts"] == 4
    assert report["detector_on_real_videos"]["colour_accuracy"] == 1.0


@pytest.mark.parametrize("args, message", [
    (["--prompt= "], "must be non-empty"),
    (["--prompt=a red square", "--out=/proc/forbidden/x.mp4"], "Cannot write"),
    (["--prompt=a red square", "--out=video.avi"], "extension must be one of"),
    (["--prompt=a red square", "--height=18"], "18"),
])
def test_generate_rejects_bad_input_with_a_clear_message(workdir, tmp_path, args, message):
    args = args if any(a.startswith("--out") for a in args) else args + [f"--out={tmp_path}/x.gif"]
    result = run("sora_jax.generate", f"--workdir={workdir}", *args, check=False)
    assert result.returncode != 0
    assert message in result.stderr


def test_train_rejects_unknown_config_key():
    result = run("sora_jax.train", "--config=configs/moving_shapes.py:runlocal,pixels",
                 "--config.model.widht=3", "--workdir=/tmp/unused", check=False)
    assert result.returncode != 0
    assert "widht" in result.stderr
