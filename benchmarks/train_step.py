r"""Measures the DiT train step of a config and prints one JSON object.

  python benchmarks/train_step.py --config=configs/moving_shapes.py [--steps=10] [--config.x=y]

Reports the median step time, model FLOPs per step (matmuls and attention, forward + backward =
3x forward), the achieved FLOP/s, and that as a fraction of this machine's matmul peak measured in
the same process (bf16 x bf16 -> f32 for bf16 models, f32 otherwise), so the ratio holds on a
busy machine. Data comes from random arrays: this times the step, not the input pipeline. It runs
under an allocator that keeps freed pages (`benchmarks/common.py`) unless LD_PRELOAD or
GLIBC_TUNABLES is set.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

if __name__ == "__main__":
    common.use_fast_allocator()

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/moving_shapes.py", "Config file.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after 2 warm-up steps).")


def main(argv):
    del argv
    import jax
    import numpy as np

    from sora_jax.training import metrics
    from sora_jax.training.experiment import Experiment

    exp = Experiment(_CONFIG.value)
    c = exp.config
    batch = common.random_batch(exp, jax.random.key(0))
    state = exp.init_state(jax.random.key(0))
    step = exp.jit_train_step()
    times = []
    with exp.activate():
        compile_start = time.perf_counter()
        state, m = step(state, batch, jax.random.key(1))
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - compile_start
        for i in range(_STEPS.value + 1):
            start = time.perf_counter()
            state, m = step(state, batch, jax.random.key(1))
            jax.block_until_ready(m)
            if i:  # the first call after compilation still warms caches
                times.append(time.perf_counter() - start)
    step_s = float(np.median(times))
    flops = exp.train_flops_per_step()
    per_device_peak = metrics.peak_flops_per_device(exp.model.dtype)
    peak = per_device_peak * jax.device_count()
    print(json.dumps({
        "benchmark": "train_step",
        "platform": jax.devices()[0].platform,
        "device_kind": jax.devices()[0].device_kind,
        "devices": jax.device_count(),
        "allocator": common.allocator(),
        "mesh": dict(exp.mesh.shape),
        "model": dict(c.model),
        "global_batch": c.data.batch_size,
        "tokens_per_example": exp.tokens_per_example(),
        "compile_and_first_step_s": round(compile_s, 3),
        "step_time_s": round(step_s, 4),
        "step_time_min_s": round(min(times), 4),
        "model_flops_per_step": flops,
        "achieved_flops_per_s": flops / step_s,
        "peak_flops_per_s": peak,
        "peak_definition": common.peak_definition(exp.model.dtype),
        "fraction_of_peak": flops / step_s / peak,
        "tokens_per_s": c.data.batch_size * exp.tokens_per_example() / step_s,
        "loss": float(m["loss"]),
    }, default=str))


if __name__ == "__main__":
    app.run(main)
