r"""Where the DiT train step's time goes on CPU, by operation; prints one JSON object.

  python benchmarks/profile_step.py --config=configs/moving_shapes.py [--steps=2 --top=25]
      [--trace_dir=DIR] [--config.x=y]

Traces `--steps` train steps with `jax.profiler` after two warm-up steps, and reads back the time of
every operation XLA's CPU runtime ran (`op_profile.py`). Reported:

  parts   matmuls without batch dimensions (the dense layers), batched matmuls (attention's
          products, one per example and head) and everything else (elementwise work, reductions,
          copies, the optimizer): time per step, share, GFLOP and GFLOP/s.
  top     the `--top` groups of operations by time, grouped by the model code they came from (the
          op_name XLA keeps: forward or backward, the module path, the primitive).

At the shape and precisions of `compare_pytorch.py`, `compare_pytorch.py --profile` adds the same
breakdown of our step to its output. Per-operation events exist on CPU only; elsewhere open the
trace (kept in --trace_dir) in Perfetto or TensorBoard. Data are random arrays, as in train_step.py.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

if __name__ == "__main__":
    common.use_fast_allocator()

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from benchmarks import op_profile  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/moving_shapes.py", "Config file.")
_STEPS = flags.DEFINE_integer("steps", 2, "Traced steps (after 2 warm-up steps).", lower_bound=1)
_TOP = flags.DEFINE_integer("top", 25, "Groups of operations to list.", lower_bound=1)
_TRACE_DIR = flags.DEFINE_string("trace_dir", None, "Keep the trace here (default: a temporary folder).")


def main(argv):
    del argv
    import jax

    from sora_jax.training.experiment import Experiment

    exp = Experiment(_CONFIG.value)
    batch = common.random_batch(exp, jax.random.key(0))
    state = exp.init_state(jax.random.key(0))
    step = exp.jit_train_step()
    rng = jax.random.key(1)
    with exp.activate():
        for _ in range(2):
            state, m = step(state, batch, rng)
        jax.block_until_ready(m)
        result = op_profile.profile(step, (state, batch, rng), steps=_STEPS.value, top=_TOP.value,
                                    trace_dir=_TRACE_DIR.value)
    print(json.dumps({
        "benchmark": "profile_step",
        "platform": jax.devices()[0].platform,
        "model": {k: exp.config.model[k] for k in ("dtype", "matmul", "attention_backend")},
        "model_gflop_per_step": round(exp.train_flops_per_step() / 1e9, 1),
        **result,
    }))


if __name__ == "__main__":
    app.run(main)
