"""Training state: named groups of (params, EMA params, optimizer state) and a step counter.

A group is one trained network with its own optimizer (the DiT today; a VAE and its discriminator
are two groups of one state). The random key is not part of the state: `train_step` receives it
and folds in the step, so a resumed run draws the same noise as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct


class Group(struct.PyTreeNode):
    """One trained network: parameters, their EMA and the optimizer state."""

    params: Any
    ema_params: Any
    opt_state: Any

    @classmethod
    def create(cls, params, tx: optax.GradientTransformation, ema_decay: float) -> "Group":
        ema = jax.tree.map(jnp.copy, params) if ema_decay > 0 else None
        return cls(params=params, ema_params=ema, opt_state=tx.init(params))

    def apply_gradients(self, grads, tx: optax.GradientTransformation, ema_decay: float) -> "Group":
        """One optimizer update; the optimizer lives outside the state, which is arrays only."""
        updates, opt_state = tx.update(grads, self.opt_state, self.params)
        params = optax.apply_updates(self.params, updates)
        ema = self.ema_params
        if ema is not None:
            ema = optax.incremental_update(params, ema, 1.0 - ema_decay)
        return self.replace(params=params, ema_params=ema, opt_state=opt_state)

    @property
    def inference_params(self):
        """EMA weights where kept, else the raw weights."""
        return self.params if self.ema_params is None else self.ema_params


class TrainState(struct.PyTreeNode):
    step: jax.Array
    groups: dict[str, Group]


def learning_rate_schedule(*, learning_rate: float, warmup_steps: int, total_steps: int,
                           decay: str = "cosine", end_fraction: float = 0.0) -> optax.Schedule:
    """Linear warm-up, then cosine decay to `end_fraction * learning_rate` (or constant)."""
    if decay == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=learning_rate, warmup_steps=max(warmup_steps, 1),
            decay_steps=max(total_steps, warmup_steps + 1), end_value=learning_rate * end_fraction)
    if decay == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, learning_rate, max(warmup_steps, 1)),
             optax.constant_schedule(learning_rate)], [max(warmup_steps, 1)])
    raise ValueError(f"Unknown learning-rate decay {decay!r}; valid: 'cosine', 'constant'.")


def adamw(schedule: optax.Schedule, *, b1: float, b2: float, weight_decay: float,
          grad_clip: float) -> optax.GradientTransformation:
    """AdamW with global-norm clipping; weight decay skips biases, norms and embeddings (ndim < 2)."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    chain = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
    chain.append(optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask))
    return optax.chain(*chain)
