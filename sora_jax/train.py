r"""Trains an experiment: `python -m sora_jax.train --config=configs/NAME.py[:args] --workdir=DIR`.

Any config value can be overridden (`--config.model.depth=4`). Rerunning the same command on the
same workdir resumes from its latest checkpoint.

Multi-host: run the same command once per host (or per process) with jax's multi-process runtime
started. Where jax discovers the cluster (Cloud TPU pods, SLURM, Open MPI, Kubernetes) add
`--distributed`. Elsewhere give the coordinator (process 0's host:port), the number of processes
and this process's index, by flags or by environment variables (a flag wins):

  --coordinator_address  SORA_JAX_COORDINATOR_ADDRESS  (or jax's own JAX_COORDINATOR_ADDRESS)
  --num_processes        SORA_JAX_NUM_PROCESSES
  --process_id           SORA_JAX_PROCESS_ID

Two processes on one machine (4 emulated CPU devices each; see experiments/README.md):

  XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu python -m sora_jax.train \
      --config=configs/moving_shapes.py:runlocal,pixels --workdir=/tmp/mh \
      --coordinator_address=localhost:12355 --num_processes=2 --process_id=0   # and =1

Every process reads its own rows of each global batch, takes part in every checkpoint save, and
process 0 alone writes the config, metrics and samples.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config: configs/NAME.py[:args].", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and samples go.")
_PROFILE_STEPS = flags.DEFINE_integer(
    "profile_steps", 0, "Capture a profiler trace (workdir/profile) of this many steps.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Start jax's multi-process runtime, discovering the cluster (TPU pods, "
    "SLURM, ...). Implied by any of the three settings below.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (env SORA_JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Number of processes (env SORA_JAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index, 0-based (env SORA_JAX_PROCESS_ID).")
flags.mark_flags_as_required(["config", "workdir"])


def distributed_settings() -> tuple[str | None, int | None, int | None]:
    """(coordinator address, number of processes, process index) from flags, else environment."""
    def setting(flag, names, kind):
        if flag.value is not None:
            return flag.value
        name, value = next(((n, os.environ[n]) for n in names if os.environ.get(n)), (None, None))
        try:
            return None if value is None else kind(value)
        except ValueError:
            raise app.UsageError(f"{name}={value!r} is not an integer; unset it or fix it.") from None

    return (setting(_COORDINATOR, ("SORA_JAX_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS"), str),
            setting(_NUM_PROCESSES, ("SORA_JAX_NUM_PROCESSES",), int),
            setting(_PROCESS_ID, ("SORA_JAX_PROCESS_ID",), int))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from sora_jax.parallel.mesh import initialize_distributed
    from sora_jax.training.loop import train

    settings = distributed_settings()
    if _DISTRIBUTED.value or any(value is not None for value in settings):
        initialize_distributed(*settings)
    logging.set_verbosity(logging.INFO)
    train(_CONFIG.value, _WORKDIR.value, profile_steps=_PROFILE_STEPS.value)


if __name__ == "__main__":
    app.run(main)
