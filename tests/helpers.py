"""Shared test utilities: a tiny dataset built once, and small configs."""

import functools
import os
import tempfile

import ml_collections

from configs import moving_shapes

_DATA_DIR = os.path.join(tempfile.gettempdir(), "sora_jax_test_tfds")


@functools.cache
def tiny_data_dir() -> str:
    """The `tiny` moving_shapes dataset, built once per machine (it is deterministic)."""
    from sora_jax.data import pipeline
    pipeline.prepare(name="moving_shapes", builder_config="tiny", data_dir=_DATA_DIR)
    return _DATA_DIR


def tiny_config(**mesh) -> ml_collections.ConfigDict:
    """The default experiment's `runlocal` variant on the tiny dataset."""
    config = moving_shapes.get_config("runlocal")
    config.data.data_dir = tiny_data_dir()
    if mesh:
        config.mesh = {**dict(data=1, fsdp=1, tensor=1, sequence=1), **mesh}
    return config
