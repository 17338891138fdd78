"""Workdirs in a bucket: what a run writes besides its checkpoints (config.json, metrics.jsonl,
samples, evaluations) goes through `sora_jax.paths`, whose gs:// branch is exercised here on a
file system that epath's test mock puts on the local disk (gs://bucket/run lands in
./gs:/bucket/run)."""

import json
import os

import ml_collections
import numpy as np
import pytest
from etils.epath import testing as epath_testing
from PIL import Image

from sora_jax import paths
from sora_jax.data.video_io import write_video
from sora_jax.training import loop
from sora_jax.training.checkpoint import restore_for_inference

RUN = "gs://bucket/run"


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """gs:// paths served from tmp_path; returns the local folder that stands for RUN."""
    monkeypatch.chdir(tmp_path)
    with epath_testing.mock_epath():
        yield tmp_path / "gs:" / "bucket" / "run"


def test_uris_stay_as_they_are_and_local_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert os.fspath(paths.path(RUN)) == RUN and not paths.is_local(RUN)
    assert os.fspath(paths.path("runs/a")) == str(tmp_path / "runs" / "a")
    assert paths.is_local("runs/a")


def test_config_metrics_and_samples_are_written_to_a_bucket(bucket):
    config = ml_collections.ConfigDict({"seed": 3, "model": {"width": 64}})
    loop.save_config(config, RUN)
    assert json.loads((bucket / "config.json").read_text())["model"]["width"] == 64
    assert loop.load_config(RUN).to_dict() == config.to_dict()
    assert not [p for p in os.listdir(bucket) if "tmp" in p]  # one upload, no leftovers

    lines = paths.JsonLines(f"{RUN}/metrics.jsonl")
    lines.write('{"step": 1}')
    lines.write('{"step": 2}')
    again = paths.JsonLines(f"{RUN}/metrics.jsonl")  # a resumed run keeps the lines so far
    again.write('{"step": 3}')
    assert (bucket / "metrics.jsonl").read_text().splitlines() == [
        '{"step": 1}', '{"step": 2}', '{"step": 3}']

    video = np.random.default_rng(0).integers(0, 255, (3, 8, 8, 3), np.uint8)
    assert write_video(f"{RUN}/samples/step_000010.gif", video, scale=1) == \
        f"{RUN}/samples/step_000010.gif"
    gif = Image.open(bucket / "samples" / "step_000010.gif")
    assert gif.size == (8, 8) and gif.n_frames == 3


def test_a_bucket_workdir_without_checkpoints_is_named(bucket):
    # Orbax itself reaches the bucket through google-cloud-storage (the `gcs` extra), which this
    # mock does not cover: only the check before it runs here.
    with pytest.raises(FileNotFoundError, match="No checkpoints in 'gs://bucket/other'"):
        restore_for_inference("gs://bucket/other", None)


def test_local_files_are_still_replaced_whole(tmp_path):
    target = tmp_path / "out" / "config.json"
    paths.write_text(target, "{}")
    paths.write_text(target, '{"a": 1}')
    assert target.read_text() == '{"a": 1}' and os.listdir(tmp_path / "out") == ["config.json"]
