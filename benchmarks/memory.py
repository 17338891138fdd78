r"""Memory and speed of the DiT train step for each remat policy, scanned and unrolled; prints JSON.

  python benchmarks/memory.py [--config=configs/moving_shapes.py] [--width=256 --depth=8 --heads=4
      --frames=61 --size=64 --batch=1] [--steps=3] [--policies=none,dots,full] [--scan=true,false]
      [--mesh=fsdp=2,tensor=2] [--config.x=y]

The size flags resize the config's DiT and clips; the defaults make activations dominate on a CPU:
width 256, depth 8, clips of 61 x 64 x 64 pixels, which the default experiment's VAE (4x4x4) turns
into 16 x 16 x 16 latents, 4096 tokens. For every remat policy (`models.dit.REMAT_POLICIES`) and
scan_layers setting it compiles the train step (on one device, or on --mesh, for which emulate
devices with XLA_FLAGS=--xla_force_host_platform_device_count=N) and reports per device:

  memory_bytes      what one call holds at once by XLA's analysis of the compiled step:
                    argument + output + temp - alias bytes (the alias term is the donated state
                    that the new state overwrites), with the four parts beside it
  estimate_bytes    sora_jax/training/memory.py's estimate, made before compiling, and its error
  step_time_s       median of --steps timed steps after a warm-up step (0: compile only)

Random latents and text: this measures the step, not the input pipeline.
"""

import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/moving_shapes.py", "Config file.")
_WIDTH = flags.DEFINE_integer("width", 256, "DiT width.")
_DEPTH = flags.DEFINE_integer("depth", 8, "DiT blocks.")
_HEADS = flags.DEFINE_integer("heads", 4, "Attention heads.")
_FRAMES = flags.DEFINE_integer("frames", 61, "Frames per clip (1 + k * the VAE's temporal compression).")
_SIZE = flags.DEFINE_integer("size", 64, "Clip height and width in pixels.")
_BATCH = flags.DEFINE_integer("batch", 1, "Global batch.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps per setting; 0 compiles only.")
_POLICIES = flags.DEFINE_list("policies", None, "Remat policies (default: all of REMAT_POLICIES).")
_SCAN = flags.DEFINE_list("scan", ["true", "false"], "scan_layers settings.")
_MESH = flags.DEFINE_list("mesh", [], "Mesh axis sizes, e.g. fsdp=2,tensor=2 (default: one device).")


def measure(config, steps: int) -> dict:
    """Compiled memory, estimate and step time of `config`'s train step on one device."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sora_jax.training import memory
    from sora_jax.training.experiment import Experiment

    exp = Experiment(config, jax.devices()[:math.prod(config.mesh.values())])
    state = exp.abstract_state()
    estimate = memory.estimate(exp, abstract_state=state)
    shapes = exp.batch_shapes()
    shardings = exp.batch_shardings(shapes)
    shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k])
              for k, v in shapes.items()}
    step = exp.jit_train_step()
    with exp.activate():
        start = time.perf_counter()
        compiled = step.lower(state, shapes, jax.random.key(0)).compile()
        compile_s = time.perf_counter() - start
    m = compiled.memory_analysis()
    measured = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                - m.alias_size_in_bytes)
    result = {
        "remat_policy": exp.model.remat_policy,
        "scan_layers": exp.model.scan_layers,
        "tokens_per_example": exp.tokens_per_example(),
        "memory_bytes": measured,
        "argument_bytes": m.argument_size_in_bytes,
        "output_bytes": m.output_size_in_bytes,
        "temp_bytes": m.temp_size_in_bytes,
        "alias_bytes": m.alias_size_in_bytes,
        "estimate_bytes": estimate["total"],
        "estimate_activation_bytes": estimate["activations"],
        "estimate_error": estimate["total"] / measured - 1.0,
        "compile_s": round(compile_s, 1),
    }
    if steps:
        keys = jax.random.split(jax.random.key(0), 2)
        batch = {"latent": jax.random.uniform(keys[0], shapes["latent"].shape, minval=-1, maxval=1),
                 "text": jax.random.normal(keys[1], shapes["text"].shape),
                 "text_mask": jnp.ones(shapes["text_mask"].shape, bool)}
        batch = jax.device_put(batch, shardings)
        train_state = exp.init_state(jax.random.key(0))
        times = []
        with exp.activate():
            for i in range(steps + 1):
                start = time.perf_counter()
                train_state, metrics = compiled(train_state, batch, jax.random.key(1))
                jax.block_until_ready(metrics)
                if i:  # the first call warms caches
                    times.append(time.perf_counter() - start)
        result["step_time_s"] = round(float(np.median(times)), 3)
        result["loss"] = float(metrics["loss"])
    return result


def main(argv):
    del argv
    import jax

    from sora_jax.models.dit import REMAT_POLICIES

    config = _CONFIG.value
    config.model.update(width=_WIDTH.value, depth=_DEPTH.value, num_heads=_HEADS.value)
    config.data.update(frames=_FRAMES.value, height=_SIZE.value, width=_SIZE.value,
                       batch_size=_BATCH.value, latent_cache=None)
    try:
        mesh = {k: int(v) for k, v in (item.split("=") for item in _MESH.value)}
    except ValueError:
        raise app.UsageError(f"--mesh takes axis=size pairs, got {_MESH.value}.") from None
    config.mesh = {**dict(data=1, fsdp=1, tensor=1, sequence=1), **mesh}
    policies = _POLICIES.value or list(REMAT_POLICIES)
    unknown = set(policies) - set(REMAT_POLICIES)
    if unknown:
        raise app.UsageError(f"Unknown --policies {sorted(unknown)}; valid: {list(REMAT_POLICIES)}.")
    scans = [{"true": True, "false": False}.get(s.lower()) for s in _SCAN.value]
    if None in scans:
        raise app.UsageError(f"--scan takes true and/or false, got {_SCAN.value}.")
    rows = []
    for policy in policies:
        for scan in scans:
            config.model.update(remat_policy=policy, scan_layers=scan)
            rows.append(measure(config, _STEPS.value))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(json.dumps({
        "benchmark": "memory",
        "platform": jax.devices()[0].platform,
        "device_kind": jax.devices()[0].device_kind,
        "cpu_count": os.cpu_count(),
        "model": {k: config.model[k] for k in ("width", "depth", "num_heads", "mlp_ratio", "dtype",
                                                "matmul", "attention_backend")},
        "clip": [_FRAMES.value, _SIZE.value, _SIZE.value],
        "mesh": dict(config.mesh),
        "batch": _BATCH.value,
        "results": rows,
    }, default=str))


if __name__ == "__main__":
    app.run(main)
