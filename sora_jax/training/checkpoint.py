"""Checkpoints: orbax CheckpointManager with async saves, the data iterator and config beside them.

A checkpoint holds three items: `state` (the TrainState arrays), `data` (the grain iterator
state, so a resumed run sees the same next batch) and `config` (JSON), plus any JSON items of the
task (`JSON_ITEMS`: a VAE's `latent_stats`). Restoring takes a target of
`jax.ShapeDtypeStruct`s carrying shardings, so a run saved on one mesh restores onto another.

On several processes every process calls `save` and `restore` with the same arguments: orbax
coordinates them, each writes its shards of the arrays, process 0 the JSON items, and each its own
data-iterator state (`data/process_I-of-N.json`, so a resume needs the same number of processes).
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

from sora_jax import paths


JSON_ITEMS = ("latent_stats",)


class CheckpointMismatchError(ValueError):
    """A checkpoint's arrays do not match the model the config describes."""


def _shape_mismatches(saved: Any, target: Any) -> list[str]:
    saved_flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(saved)}
    target_flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(target)}
    problems = [f"{k}: missing in checkpoint" for k in target_flat.keys() - saved_flat.keys()]
    problems += [f"{k}: in checkpoint but not in model" for k in saved_flat.keys() - target_flat.keys()]
    for k in sorted(target_flat.keys() & saved_flat.keys()):
        if tuple(saved_flat[k].shape) != tuple(target_flat[k].shape):
            problems.append(f"{k}: checkpoint {tuple(saved_flat[k].shape)} vs "
                            f"model {tuple(target_flat[k].shape)}")
    return sorted(problems)


class Checkpointer:
    """Saves and restores (state, data iterator, config) under `directory`."""

    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = os.fspath(paths.path(directory))  # local: absolute; gs://: as given
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True),
            # Named handlers let a fresh manager read an item's metadata before restoring it.
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": grain.checkpoint.CheckpointHandler(),
                           "config": ocp.JsonCheckpointHandler(),
                           **{name: ocp.JsonCheckpointHandler() for name in JSON_ITEMS}},
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, *, data_iterator=None,
             config: ml_collections.ConfigDict | None = None,
             json_items: dict[str, Any] | None = None) -> None:
        """Starts an async save of `step`; a save already pending for this step is a no-op."""
        if step in self._manager.all_steps():
            return
        unknown = set(json_items or {}) - set(JSON_ITEMS)
        if unknown:
            raise ValueError(f"Unknown checkpoint items {sorted(unknown)}; known: {JSON_ITEMS}.")
        items = {"state": ocp.args.StandardSave(state)}
        items.update({k: ocp.args.JsonSave(v) for k, v in (json_items or {}).items()})
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        if config is not None:
            items["config"] = ocp.args.JsonSave(config.to_dict())
        self._manager.save(step, args=ocp.args.Composite(**items))

    def check_compatible(self, step: int, abstract_state: Any) -> None:
        """Raises CheckpointMismatchError naming every parameter whose shape differs.

        Parameters are nested dicts on both sides, so their paths compare directly; the optimizer
        state follows from them.
        """
        saved = self._manager.item_metadata(step)["state"].tree
        problems = []
        for name, group in abstract_state.groups.items():
            saved_group = saved.get("groups", {}).get(name)
            if saved_group is None:
                problems.append(f"group {name!r}: missing in checkpoint")
                continue
            problems += [f"{name}{p}" for p in _shape_mismatches(saved_group["params"], group.params)]
        if problems:
            listing = "\n  ".join(problems[:20]) + ("\n  ..." if len(problems) > 20 else "")
            raise CheckpointMismatchError(
                f"The checkpoint at {self.directory} (step {step}) does not match this config's "
                f"model:\n  {listing}\nUse a new --workdir for a different model, or the config the "
                "checkpoint was trained with. Nothing was overwritten.")

    def restore(self, step: int, abstract_state: Any, *, data_iterator=None) -> Any:
        """Restores `step` onto the shardings carried by `abstract_state`'s ShapeDtypeStructs."""
        self.check_compatible(step, abstract_state)
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"]

    def restore_json(self, step: int, name: str) -> Any:
        """A JSON item of `step` (see JSON_ITEMS); KeyError naming it when the step has none."""
        if not (paths.path(self.directory) / str(step) / name).is_dir():
            raise KeyError(f"Checkpoint step {step} in {self.directory} has no {name!r} item.")
        restored = self._manager.restore(step, args=ocp.args.Composite(**{name: ocp.args.JsonRestore()}))
        return restored[name]

    def restore_config(self, step: int) -> ml_collections.ConfigDict:
        restored = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return ml_collections.ConfigDict(restored["config"])

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def restore_for_inference(workdir: str, abstract_state: Any, step: int | None = None,
                          json_items: tuple[str, ...] = ()) -> tuple[Any, int]:
    """Restores a trained state from `workdir/checkpoints` (the latest step unless given).

    With json_items, returns (state, step, {name: item}) instead.
    """
    directory = os.fspath(paths.path(workdir) / "checkpoints")
    if not paths.path(directory).is_dir():
        raise FileNotFoundError(f"No checkpoints in {workdir!r}; train first with "
                                f"`python -m sora_jax.train --workdir={workdir} --config=...`.")
    ckpt = Checkpointer(directory, async_save=False)
    steps = ckpt.all_steps()
    if not steps:
        raise FileNotFoundError(f"{directory!r} holds no finished checkpoint yet.")
    if step is None:
        step = max(steps)
    elif step not in steps:
        raise ValueError(f"No checkpoint for step {step} in {directory!r}; available: {sorted(steps)}.")
    state = ckpt.restore(step, abstract_state)
    items = {name: ckpt.restore_json(step, name) for name in json_items}
    ckpt.close()
    return (state, step, items) if json_items else (state, step)
