"""The training loop: data, jit with shardings, logging, evaluation, samples and checkpoints.

Everything numerical happens in the pure `train_step` (training/step.py); this file only moves
data in, metrics and checkpoints out. Rerunning the same command on the same workdir resumes
where it stopped, with the same next batch and the same random numbers.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm
from absl import logging
from jax.experimental import multihost_utils
from orbax.checkpoint import multihost

from sora_jax import paths
from sora_jax.data import latent_cache, pipeline
from sora_jax.training import memory
from sora_jax.training import metrics as metrics_lib
from sora_jax.training.checkpoint import Checkpointer
from sora_jax.training.experiment import get_experiment, text_identity


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite."""


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    paths.write_text(paths.path(workdir) / "config.json", config.to_json_best_effort(indent=2))


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a workdir was trained with (what `generate` and `evaluate` use)."""
    path = paths.path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"No config.json in {workdir!r}: is it a training workdir? "
                                "Train first with `python -m sora_jax.train --workdir=...`.")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def check_data_shape(config: ml_collections.ConfigDict, data_kw: dict) -> None:
    """The dataset's clips must have the size the config's model and shardings are built for."""
    stored = pipeline.clip_shape(**data_kw)
    expected = (config.data.frames, config.data.height, config.data.width, 3)
    if None in stored and not config.data.get("batching"):
        raise ValueError(
            f"Dataset {config.data.name}/{config.data.builder_config} holds clips of many sizes; "
            "train on it with config.data.batching='pack', 'bucket' or 'pad' (see "
            "configs/moving_shapes_mixed.py).")
    if None not in stored and stored != expected:
        raise ValueError(
            f"Dataset {config.data.name}/{config.data.builder_config} holds clips of shape {stored}, "
            f"but config.data.(frames, height, width) give {expected[:3]}; set them to "
            f"{stored[:3]} or choose another config.data.builder_config.")


def wait_for_every_process(name: str) -> None:
    """A barrier of jax's coordination service (not a collective); nothing on one process.

    On CPU, gloo gives a process 30 s to meet its peers at their first collective, and
    compilation and data loading take longer than that on some processes of a busy machine.
    """
    if jax.process_count() > 1:
        multihost.get_barrier_sync_fn()(key=name, timeout_ms=60 * 60 * 1000)


class _Preemption:
    """SIGTERM (TPU preemption, job schedulers) as a step at which to save and stop.

    One process: a handler sets a flag that the loop polls between steps. Several: jax's
    preemption service (started by `jax.distributed.initialize`) owns SIGTERM. A notice to any
    process reaches all of them, and `reached_preemption_sync_point` names the same step on every
    process, so they save one checkpoint together. A Python handler would take the signal from the
    service, and a process saving alone would wait forever for the others.
    """

    def __init__(self):
        self.requested = False
        self._previous = None
        self._distributed = False

    def __enter__(self):
        self._distributed = jax.process_count() > 1
        if self._distributed:
            return self
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler, nothing to restore
            self._previous = None
        return self

    def should_stop(self, step: int) -> bool:
        """Whether to save and stop before `step`; on several processes, called at every step."""
        if self._distributed:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def _handle(self, signum, frame):
        del signum, frame
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def train(config: ml_collections.ConfigDict, workdir: str, *, profile_steps: int = 0,
          devices: Any = None):
    """Trains (or resumes training of) the experiment `config` in `workdir`. Returns the state.

    The task's experiment (`get_experiment`: the DiT or the VAE) supplies the model, the step and
    the hooks; everything else here is shared. `devices` (default: all) are what config.mesh
    spans.
    """
    exp = get_experiment(config, devices)
    c = config
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=c.train.max_to_keep)
    abstract = exp.abstract_state()
    start = ckpt.latest_step()
    if start is not None:
        ckpt.check_compatible(start, abstract)  # before anything in the workdir changes
        if start >= c.train.num_steps:
            logging.info("%s holds a finished run (step %d of %d); nothing to train. Raise "
                         "config.train.num_steps to train on.", workdir, start, c.train.num_steps)
            state = ckpt.restore(start, abstract)
            ckpt.close()
            return state
    if jax.process_index() == 0:  # one writer for the files of the workdir; checkpoints are joint
        save_config(c, workdir)

    data_kw = pipeline.data_kwargs(c.data)
    check_data_shape(c, data_kw)
    if data_kw.get("latent_cache"):
        latent_cache.check_matches(data_kw["latent_cache"], latent_shape=exp.cache_latent_shape(),
                                   text=text_identity(c.text),
                                   end_frame=getattr(exp, "end_frame", None))
    # Each process reads the rows of every global batch that its devices hold, so any number of
    # processes trains on the batches a single process would (pipeline.GlobalBatchSampler).
    rows = exp.host_rows()
    collate = "list" if c.data.get("batching") else "stack"  # clips of many sizes: batched later
    train_iter = iter(pipeline.make_loader(
        **data_kw, split=c.data.train_split, batch_size=c.data.batch_size, rows=rows, seed=c.seed,
        shuffle=True, worker_count=c.data.worker_count, collate=collate))
    if start is None:
        state = exp.init_state(jax.random.key(c.seed))
        start = 0
        logging.info("Initialised a new model in %s.", workdir)
    else:
        state = ckpt.restore(start, abstract, data_iterator=train_iter)
        logging.info("Resumed from step %d in %s.", start, workdir)
    logging.info("%s, mesh %s.", exp.describe(state), dict(exp.mesh.shape))
    logging.info("%s", memory.summary(exp, abstract))

    train_step = exp.jit_train_step()
    base_rng = jax.random.key(c.seed + 1)
    if jax.process_count() > 1:  # compiled ahead, so that the processes' first steps meet
        with exp.activate():
            train_step = train_step.lower(state, exp.batch_shapes(), base_rng).compile()
    # Fixed validation batches and fixed training clips for checkpoint statistics: comparable
    # across steps and runs.
    def fixed_batches(split: str) -> list:
        it = exp.train_batches(iter(pipeline.make_loader(
            **data_kw, split=split, batch_size=c.data.batch_size, rows=rows, seed=c.seed,
            collate=collate, shuffle=False, num_epochs=1, worker_count=0,
            drop_remainder=collate == "stack")))
        return [next(it) for _ in range(c.train.num_eval_batches)]

    val_batches = fixed_batches(c.data.validation_split)
    stat_batches = fixed_batches(c.data.train_split) if c.task == "vae" else []

    writer = metrics_lib.MetricWriter(workdir)
    flops_per_step = exp.train_flops_per_step() if hasattr(exp, "train_flops_per_step") else None
    peak = metrics_lib.peak_flops_per_device(exp.model.dtype) * jax.device_count() \
        if flops_per_step else None
    pending: list[tuple[int, dict]] = []
    window_start, window_steps = time.perf_counter(), 0

    def check_and_log(step: int) -> None:
        """Fetches pending metrics; stops on a non-finite loss; logs means over the window."""
        nonlocal window_start, window_steps
        fetched = jax.device_get(pending)
        pending.clear()
        for s, m in fetched:
            if not np.isfinite(m["loss"]):
                ckpt.wait()
                raise TrainingDiverged(
                    f"Loss is {m['loss']} at step {s}. Training stopped; the last good checkpoint "
                    f"is step {ckpt.latest_step()} in {ckpt.directory} and was kept. Lower "
                    "config.optim.learning_rate or raise config.optim.warmup_steps, then rerun.")
        if not fetched:
            return
        elapsed = time.perf_counter() - window_start
        steps_per_s = window_steps / max(elapsed, 1e-9)
        scalars = {k: float(np.mean([m[k] for _, m in fetched])) for k in fetched[0][1]}
        scalars.update(exp.throughput(steps_per_s))
        if flops_per_step:
            scalars["mfu"] = steps_per_s * flops_per_step / peak
        writer.write(step, scalars)
        remaining = (c.train.num_steps - step) / max(steps_per_s, 1e-9)
        logging.info("step %d/%d: %s, eta %.0fs", step, c.train.num_steps,
                     metrics_lib.format_scalars(scalars), remaining)
        window_start, window_steps = time.perf_counter(), 0

    def evaluate(step: int) -> None:
        scalars = exp.validation_scalars(state, val_batches)
        writer.write(step, scalars)
        logging.info("step %d validation: %s", step, metrics_lib.format_scalars(scalars))

    def write_samples(step: int) -> None:
        logging.info("step %d samples: %s", step, exp.write_samples(state, step, workdir, val_batches))

    def save(step: int) -> None:
        check_and_log(step)
        ckpt.save(step, state, data_iterator=train_iter, config=c,
                  json_items=exp.checkpoint_items(state, stat_batches))

    profile_range = (start + 2, start + 2 + profile_steps) if profile_steps else None
    progress = tqdm.tqdm(total=c.train.num_steps, initial=start, desc="train", unit="step",
                         mininterval=10, disable=jax.process_index() != 0)
    step = start
    batches = exp.train_batches(train_iter)  # device batches from the host batches
    with _Preemption() as preemption, exp.activate():
        while step < c.train.num_steps:
            if preemption.should_stop(step):
                logging.warning("SIGTERM: saving a checkpoint at step %d before exiting.", step)
                save(step)
                break
            if profile_range and step == profile_range[0]:
                jax.profiler.start_trace(os.path.join(workdir, "profile"))
            batch = next(batches)
            if step == start:
                wait_for_every_process(f"sora_jax_first_step_{start}")
            state, metrics = train_step(state, batch, base_rng)
            step += 1
            window_steps += 1
            pending.append((step, metrics))
            progress.update(1)
            if profile_range and step == profile_range[1]:
                jax.block_until_ready(state)
                jax.profiler.stop_trace()
                logging.info("Profile of steps %d-%d in %s.", *profile_range,
                             os.path.join(workdir, "profile"))
            if step == start + 1:  # the first step includes compilation: keep it out of rates
                jax.block_until_ready(metrics)
                window_start, window_steps = time.perf_counter(), 0
            if step % c.train.log_every == 0:
                check_and_log(step)
            if step % c.train.eval_every == 0 or step == c.train.num_steps:
                evaluate(step)
            if step % c.train.checkpoint_every == 0 or step == c.train.num_steps:
                save(step)
            if step % c.train.sample_every == 0 or step == c.train.num_steps:
                write_samples(step)
    progress.close()
    check_and_log(step)
    ckpt.wait()
    ckpt.close()
    writer.close()
    return state
