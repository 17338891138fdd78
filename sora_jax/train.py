r"""Trains an experiment: `python -m sora_jax.train --config=configs/NAME.py[:args] --workdir=DIR`.

Any config value can be overridden (`--config.model.depth=4`). Rerunning the same command on the
same workdir resumes from its latest checkpoint. On a multi-host TPU slice, run the same command on
every worker with `--distributed` (see experiments/README.md).
"""

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config: configs/NAME.py[:args].", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and samples go.")
_PROFILE_STEPS = flags.DEFINE_integer(
    "profile_steps", 0, "Capture a profiler trace (workdir/profile) of this many steps.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Start jax's multi-process runtime (auto-configured on TPU pods).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from sora_jax.parallel.mesh import initialize_distributed
    from sora_jax.training.loop import train

    if _DISTRIBUTED.value or _COORDINATOR.value:
        initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    logging.set_verbosity(logging.INFO)
    train(_CONFIG.value, _WORKDIR.value, profile_steps=_PROFILE_STEPS.value)


if __name__ == "__main__":
    app.run(main)
