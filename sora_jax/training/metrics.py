"""Metrics to TensorBoard event files and the console, and the FLOP accounting behind MFU."""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from sora_jax import paths

# Dense bf16 peak FLOP/s per chip, for MFU on accelerators (vendor figures).
ACCELERATOR_PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
}


def measure_matmul_peak(dtype=jnp.bfloat16, size: int = 1024, seconds: float = 1.0) -> float:
    """Matmul throughput (FLOP/s) of one device on all its threads.

    bf16 operands accumulate in f32 (`preferred_element_type`), the fast path on CPUs; f32 measures
    the f32 peak. Measured in the calling process so ratios to it hold on a busy machine.
    """
    a = jnp.ones((size, size), dtype)
    f = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
    f(a, a).block_until_ready()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or n < 3:
        f(a, a).block_until_ready()
        n += 1
    return 2 * size**3 * n / (time.perf_counter() - start)


def peak_flops_per_device(compute_dtype) -> float:
    """The accelerator's published peak, or the measured matmul peak on a CPU."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        return measure_matmul_peak(jnp.bfloat16 if compute_dtype == jnp.bfloat16 else jnp.float32)
    for name, peak in ACCELERATOR_PEAK_FLOPS.items():
        if device.device_kind.startswith(name):
            return peak
    logging.warning("No peak FLOP/s known for %s; MFU is not reported.", device.device_kind)
    return float("nan")


class MetricWriter:
    """Scalars to TensorBoard event files and to `metrics.jsonl` (one JSON object per write).

    Only process 0 writes. The JSON lines are for notebooks and tests (`pandas.read_json(...,
    lines=True)`).
    """

    def __init__(self, workdir: str):
        self._writer = self._jsonl = None
        if jax.process_index() == 0:
            from tensorboardX import SummaryWriter
            self._writer = SummaryWriter(os.fspath(paths.path(workdir) / "tensorboard"))
            self._jsonl = paths.JsonLines(paths.path(workdir) / "metrics.jsonl")

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if self._writer is None:
            return
        for name, value in scalars.items():
            self._writer.add_scalar(name, float(value), step)
        self._writer.flush()
        self._jsonl.write(json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}}))

    def close(self):
        if self._writer is not None:
            self._writer.close()
            self._jsonl.close()


def format_scalars(scalars: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in scalars.items() if np.isfinite(v))
