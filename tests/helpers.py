"""Shared test utilities: a tiny dataset built once, and small configs."""

import functools
import os
import re
import tempfile

import ml_collections

from configs import moving_shapes, vae_moving_shapes


@functools.cache
def tiny_data_dir() -> str:
    """The `tiny` moving_shapes dataset (under a second to build), built once per test session."""
    from sora_jax.data import pipeline
    data_dir = tempfile.mkdtemp(prefix="sora_jax_tfds_")
    pipeline.prepare(name="moving_shapes", builder_config="tiny", data_dir=data_dir)
    return data_dir


def xla_flags(devices: int) -> str:
    """This process's XLA flags (the compilation settings of conftest.py), for a subprocess that
    emulates `devices` CPU devices instead of the suite's 8."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    return f"--xla_force_host_platform_device_count={devices} {flags}".strip()


def laptop_env(**extra: str) -> dict[str, str]:
    """This process's environment for a subprocess that runs as on a laptop: one CPU device."""
    return {**os.environ, "XLA_FLAGS": xla_flags(1), **extra}


def one_device() -> list:
    """What a laptop has: training through the loop on one device of the 8 emulated compiles and
    runs in about half the time (sharded steps have tests of their own)."""
    import jax
    return jax.devices()[:1]


def tiny_config(**mesh) -> ml_collections.ConfigDict:
    """The default experiment's `runlocal` variant in pixel space (no VAE) on the tiny dataset."""
    config = moving_shapes.get_config("runlocal,pixels")
    config.data.data_dir = tiny_data_dir()
    if mesh:
        config.mesh = {**dict(data=1, fsdp=1, tensor=1, sequence=1), **mesh}
    return config


def tiny_vae_config(arg: str = "runlocal") -> ml_collections.ConfigDict:
    """The VAE config's `runlocal` variant on the tiny dataset."""
    config = vae_moving_shapes.get_config(arg)
    config.data.data_dir = tiny_data_dir()
    return config


@functools.cache
def tiny_vae_workdir() -> str:
    """A VAE trained by the runlocal config (4 steps), once per test session."""
    from sora_jax.training import loop
    workdir = tempfile.mkdtemp(prefix="sora_jax_vae_")
    loop.train(tiny_vae_config(), workdir, devices=one_device())
    return workdir
