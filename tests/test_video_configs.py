"""The video DiT sizes of configs/video_dit.py build, shard and fit as their table says.

A 512-chip mesh cannot be built on the 8 emulated devices, so each size's mesh is scaled down to 8
devices with the same axis names: resolved on the size's slice, then the largest axis halved until
8 devices remain (10B's fsdp 64 x tensor 2 x sequence 2 becomes 2 x 2 x 2). Every axis the slice
splits still splits, so the shardings the params get are the ones the slice gives them. Only
`jax.eval_shape` runs: no array of these sizes exists.
"""

import math
import os
import subprocess

import jax
import pytest
from jax.sharding import PartitionSpec as P

from configs import video_dit
from sora_jax.parallel.mesh import MESH_AXES, mesh_shape
from sora_jax.training import memory
from tests.test_configs import abstract_train_step

NOMINAL = {"100M": 100e6, "1B": 1e9, "3B": 3e9, "10B": 10e9}
LAUNCH = os.path.join(os.path.dirname(__file__), "..", "experiments", "launch_tpu.sh")


def slice_mesh(size: dict) -> dict[str, int]:
    """The mesh a size's config.mesh resolves to on its slice."""
    return dict(zip(MESH_AXES, mesh_shape(size["mesh"], size["chips"])))


def scaled_mesh(mesh: dict[str, int], devices: int) -> dict[str, int]:
    """The same axes on `devices` devices: the largest axis halved until they fit."""
    mesh = dict(mesh)
    while math.prod(mesh.values()) > devices:
        largest = max(mesh, key=mesh.get)
        mesh[largest] //= 2
    return mesh


def test_every_size_is_in_the_table_with_its_slice():
    assert set(video_dit.SIZES) == set(NOMINAL)
    for size in video_dit.SIZES.values():
        family, cores = size["slice"].split("-")
        # v5p slices are named by TensorCores (two a chip), v6e slices by chips.
        assert size["chips"] == int(cores) // (2 if family == "v5p" else 1)
    assert video_dit.get_config().model.width == video_dit.SIZES[video_dit.DEFAULT_SIZE]["width"]


def test_the_scaled_mesh_keeps_every_axis_the_slice_splits():
    assert slice_mesh(video_dit.SIZES["10B"]) == dict(data=1, fsdp=64, tensor=2, sequence=2)
    assert scaled_mesh(dict(data=1, fsdp=64, tensor=2, sequence=2), 8) == dict(
        data=1, fsdp=2, tensor=2, sequence=2)
    assert scaled_mesh(dict(data=1, fsdp=16, tensor=4, sequence=1), 8) == dict(
        data=1, fsdp=2, tensor=4, sequence=1)


@pytest.mark.parametrize("name", list(video_dit.SIZES))
def test_size_builds_shards_and_fits_its_slice(name):
    size = video_dit.SIZES[name]
    config = video_dit.get_config(name)
    config.mesh = scaled_mesh(slice_mesh(size), jax.device_count())
    exp, state, new_state, metrics = abstract_train_step(config)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    assert metrics["loss"].shape == ()

    params = state.groups["dit"].params
    count = sum(x.size for x in jax.tree.leaves(params))
    assert abs(count / NOMINAL[name] - 1) < 0.15, f"{name}: {count / 1e6:.1f}M parameters"

    # Kernels: layers stacked unsharded, model width over fsdp (ZeRO-3), heads and MLP over tensor.
    specs = jax.tree.map(lambda s: s.spec, exp.state_shardings.groups["dit"].params)
    blocks = specs["blocks"]
    assert blocks["attn"]["qkv"]["kernel"] == P(None, "fsdp", None, "tensor", None)
    assert blocks["attn"]["out"]["kernel"] == P(None, "tensor", None, "fsdp")
    assert blocks["mlp"]["fc1"]["kernel"] == P(None, "fsdp", "tensor")
    assert blocks["mlp"]["fc2"]["kernel"] == P(None, "tensor", "fsdp")
    # On the slice, a device holds 1 / (fsdp x tensor) of each such kernel and of its moments.
    mesh = slice_mesh(size)
    kernel = params["blocks"]["mlp"]["fc1"]["kernel"]
    assert memory.shard_bytes(kernel.shape, kernel.dtype, blocks["mlp"]["fc1"]["kernel"], mesh) \
        == kernel.size * 4 // (mesh["fsdp"] * mesh["tensor"])

    estimate = memory.estimate(exp, mesh, abstract_state=state)
    assert estimate["devices"] == size["chips"]
    assert estimate["rows_per_device"] >= 1
    assert estimate["total"] < 0.75 * size["hbm_gb"] * 1e9, \
        f"{name}: {estimate['total'] / 1e9:.1f} GB of {size['hbm_gb']}"


def test_launch_script_creates_the_slice_of_each_size_and_trains_on_every_worker(tmp_path):
    """Runs experiments/launch_tpu.sh against a stand-in `gcloud` that records its arguments."""
    log = tmp_path / "calls"
    fake = tmp_path / "gcloud"
    fake.write_text(f'#!/bin/sh\n{{ printf "%s " "$@" | tr "\\n" " "; echo; }} >> {log}\n'
                    '[ "$4" = describe ] && exit 1\nexit 0\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "REPO": "https://example/r.git",
           "REF": "main"}
    for name, size in video_dit.SIZES.items():
        log.write_text("")
        subprocess.run(["bash", LAUNCH, name, "us-east5-a", "gs://bucket"], env=env, check=True,
                       capture_output=True)
        calls = log.read_text().splitlines()
        create = next(c for c in calls if " create " in f" {c} ")
        assert f"--accelerator-type={size['slice']}" in create
        train = next(c for c in calls if "sora_jax.train" in c)
        assert "--worker=all" in train
        assert f"--config=configs/video_dit.py:{name} " in train
        assert "--workdir=gs://bucket/runs/" in train and "--distributed" in train
    bad = subprocess.run(["bash", LAUNCH, "2B", "us-east5-a", "bucket"], env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "valid: 100M 1B 3B 10B" in bad.stderr
