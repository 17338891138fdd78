"""The DiT training and evaluation steps: pure functions of (state, batch, rng), jitted by the loop.

Batches hold latents (the autoencoder's output; pixels for the identity autoencoder) and text:
  latent: float32 [B, T, H, W, C]
  text: float32 [B, L, D] frozen text-encoder tokens; text_mask: bool [B, L]
Packed batches (`make_packed_train_step`) hold rows of several clips of different sizes, as
`data.packing.pack` makes them: tokens [R, L, P], segment_ids, positions, slot, slot_clip, text
[R, M, Lc, D], text_mask, sizes.
With mask_weights (`diffusion.masks`), each step draws which temporal positions of each clip are
given as conditioning: they are clean (t = 0) and left out of the loss.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from sora_jax.diffusion.flow import RectifiedFlow
from sora_jax.diffusion.masks import (check_mask_weights, sample_given, sample_slot_given,
                                     with_end_image)
from sora_jax.training.state import TrainState

Batch = dict[str, jax.Array]


def _forward(model: nn.Module, params, batch: Batch, x_t, t, drop_text):
    return model.apply({"params": params}, x_t, t, batch["text"], batch["text_mask"], drop_text)


def draw_noise(flow: RectifiedFlow, latent: jax.Array, rng: jax.Array, *, caption_dropout: float,
               temporal_patch: int, mask_weights: dict[str, float] | None = None) -> Batch:
    """The randomness of one training step: times t [B, T // pt], noise, which captions are dropped
    ([B]) and, with mask_weights, which temporal positions are given (bool [B, T // pt],
    `masks.sample_given`), whose time is then 0; with the end_image strategy, also which clips
    hold their end image in their last frame (`end_image`, bool [B])."""
    batch_size, frames = latent.shape[:2]
    positions = frames // temporal_patch
    rng, rng_given = jax.random.split(rng) if mask_weights else (rng, None)
    rng_t, rng_noise, rng_drop = jax.random.split(rng, 3)
    # One time per clip, shared by its frames.
    t = jnp.repeat(flow.sample_time(rng_t, batch_size)[:, None], positions, axis=1)
    draw = {
        "t": t,
        "noise": jax.random.normal(rng_noise, latent.shape, latent.dtype),
        "drop_text": jax.random.bernoulli(rng_drop, caption_dropout, (batch_size,)),
    }
    if mask_weights:
        given, end_image = sample_given(rng_given, mask_weights, jnp.full((batch_size,), positions),
                                        positions, return_end_image=True)
        draw.update(t=jnp.where(given, 0.0, t), given=given)
        if mask_weights.get("end_image"):
            if temporal_patch != 1:
                raise ValueError(f"The end_image mask needs a temporal patch of 1 (an end image is "
                                 f"one latent frame), got {temporal_patch}.")
            draw["end_image"] = end_image
    return draw


def flow_loss(model: nn.Module, flow: RectifiedFlow, params, batch: Batch) -> jax.Array:
    """Mean velocity-space loss of a batch that carries its noise draw (see `draw_noise`); given
    positions (batch["given"], if drawn) are left out of each example's mean."""
    x0, noise, t = batch["latent"], batch["noise"], batch["t"]
    prediction = _forward(model, params, batch, flow.interpolate(x0, noise, t), t,
                          batch["drop_text"])
    given = batch.get("given")
    return jnp.mean(flow.loss(prediction, x0, noise, t, None if given is None else ~given))


def _update(state: TrainState, batch: Batch, grad_fn, *, tx: optax.GradientTransformation,
            schedule: optax.Schedule, ema_decay: float, grad_accum_steps: int, group: str):
    """One optimizer step of `group` on the gradient of grad_fn(params, batch) -> (loss, grads).

    With grad_accum_steps = k the batch (with its noise, drawn once for the whole batch) is split
    into k microbatches whose gradients are averaged in a scan before one optimizer update: the
    update equals the one-batch update while memory scales with the microbatch.
    """
    g = state.groups[group]
    if grad_accum_steps == 1:
        loss, grads = grad_fn(g.params, batch)
    else:
        micro = jax.tree.map(
            lambda x: x.reshape((grad_accum_steps, x.shape[0] // grad_accum_steps) + x.shape[1:]),
            batch)

        def accumulate(carry, microbatch):
            return jax.tree.map(jnp.add, carry, grad_fn(g.params, microbatch)), None

        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, g.params))
        (loss, grads), _ = jax.lax.scan(accumulate, zeros, micro)
        loss, grads = jax.tree.map(lambda x: x / grad_accum_steps, (loss, grads))
    metrics = {
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": schedule(state.step),
    }
    groups = {**state.groups, group: g.apply_gradients(grads, tx, ema_decay)}
    return state.replace(step=state.step + 1, groups=groups), metrics


def make_train_step(model: nn.Module, flow: RectifiedFlow, *, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, ema_decay: float, caption_dropout: float,
                    temporal_patch: int, grad_accum_steps: int = 1, group: str = "dit",
                    mask_weights: dict[str, float] | None = None) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, dict]]:
    """Returns train_step(state, batch, rng) -> (state, metrics); see `_update` for grad_accum_steps.

    mask_weights: relative weights of `masks.MASK_STRATEGIES` to draw given positions from; None (or
    empty) for none. With masks the metrics add given_fraction, the fraction of positions given.
    The batch holds latent [B, T, h, w, c], text [B, L, D] and text_mask [B, L]; with the end_image
    mask also end_latent [B, 1, h, w, c], each clip's end image (`masks.with_end_image`).
    """
    mask_weights = check_mask_weights(mask_weights)
    grad_fn = jax.value_and_grad(functools.partial(flow_loss, model, flow))

    def train_step(state: TrainState, batch: Batch, rng: jax.Array):
        rng = jax.random.fold_in(rng, state.step)
        batch = {**batch, **draw_noise(flow, batch["latent"], rng, caption_dropout=caption_dropout,
                                       temporal_patch=temporal_patch, mask_weights=mask_weights)}
        if "end_image" in batch:
            batch["latent"] = with_end_image(batch["latent"], batch.pop("end_latent"),
                                             batch["end_image"])
        state, metrics = _update(state, batch, grad_fn, tx=tx, schedule=schedule, ema_decay=ema_decay,
                                 grad_accum_steps=grad_accum_steps, group=group)
        if mask_weights:
            metrics["given_fraction"] = jnp.mean(batch["given"])
        return state, metrics

    return train_step


def draw_packed_noise(flow: RectifiedFlow, batch: Batch, rng: jax.Array, *, caption_dropout: float,
                      mask_weights: dict[str, float] | None = None) -> Batch:
    """The randomness of one packed training step: one time per clip, given to each of its slots
    (t [R, K]), noise per token value, which clips' captions are dropped ([R, M]) and, with
    mask_weights, which slots are given (bool [R, K], one `masks.sample_given` draw per clip), whose
    time is then 0."""
    rows, clips = batch["text_mask"].shape[:2]
    rng, rng_given = jax.random.split(rng) if mask_weights else (rng, None)
    rng_t, rng_noise, rng_drop = jax.random.split(rng, 3)
    clip_t = flow.sample_time(rng_t, rows * clips).reshape(rows, clips)
    t = jnp.take_along_axis(clip_t, jnp.maximum(batch["slot_clip"] - 1, 0), axis=1)
    draw = {
        "t": t,
        "noise": jax.random.normal(rng_noise, batch["tokens"].shape, batch["tokens"].dtype),
        "drop_text": jax.random.bernoulli(rng_drop, caption_dropout, (rows, clips)),
    }
    if mask_weights:
        given = sample_slot_given(rng_given, mask_weights, batch["slot_clip"], clips)
        draw.update(t=jnp.where(given, 0.0, t), given=given)
    return draw


def packed_flow_loss(model: nn.Module, flow: RectifiedFlow, params, batch: Batch) -> jax.Array:
    """Mean velocity-space loss over the clips' token values of a packed batch that carries its noise
    draw (see `draw_packed_noise`). Padding tokens, and the tokens of given slots (batch["given"], if
    drawn), are left out, so every generated token weighs the same whatever row it shares."""
    x0, noise = batch["tokens"], batch["noise"]
    t = jnp.take_along_axis(batch["t"], batch["slot"], axis=1)[..., None]  # [R, L, 1]
    x_t = flow.interpolate(x0, noise, t)
    prediction = model.apply(
        {"params": params}, x_t, batch["t"], batch["text"], batch["text_mask"],
        segment_ids=batch["segment_ids"], positions=batch["positions"], slot=batch["slot"],
        slot_clip=batch["slot_clip"], drop_text=batch["drop_text"], sizes=batch.get("sizes"),
        method="packed")
    error = jnp.square(flow.to_velocity(prediction, x_t, t) - (noise - x0))
    counted = batch["segment_ids"] > 0
    if "given" in batch:
        counted &= ~jnp.take_along_axis(batch["given"], batch["slot"], axis=1)
    counted = counted[..., None]
    return jnp.sum(jnp.where(counted, error, 0.0)) / (jnp.maximum(jnp.sum(counted), 1) * x0.shape[-1])


def make_packed_train_step(model: nn.Module, flow: RectifiedFlow, *, tx: optax.GradientTransformation,
                           schedule: optax.Schedule, ema_decay: float, caption_dropout: float,
                           grad_accum_steps: int = 1, group: str = "dit",
                           mask_weights: dict[str, float] | None = None) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, dict]]:
    """Returns train_step(state, packed_batch, rng) -> (state, metrics) for packed batches (the
    arrays of `data.packing.pack`), with `packed_flow_loss`; the metrics add packing_efficiency, the
    fraction of token positions that hold clips rather than padding. With grad_accum_steps, rows
    split into microbatches whose token means weigh the same (see `_update`). mask_weights: as
    `make_train_step`'s; given_fraction is then the fraction of the clips' slots given."""
    mask_weights = check_mask_weights(mask_weights)
    grad_fn = jax.value_and_grad(functools.partial(packed_flow_loss, model, flow))

    def train_step(state: TrainState, batch: Batch, rng: jax.Array):
        rng = jax.random.fold_in(rng, state.step)
        batch = {**batch, **draw_packed_noise(flow, batch, rng, caption_dropout=caption_dropout,
                                              mask_weights=mask_weights)}
        state, metrics = _update(state, batch, grad_fn, tx=tx, schedule=schedule, ema_decay=ema_decay,
                                 grad_accum_steps=grad_accum_steps, group=group)
        metrics["packing_efficiency"] = jnp.mean(batch["segment_ids"] > 0)
        if mask_weights:
            metrics["given_fraction"] = (jnp.sum(batch["given"])
                                         / jnp.maximum(jnp.sum(batch["slot_clip"] > 0), 1))
        return state, metrics

    return train_step


def make_eval_step(model: nn.Module, flow: RectifiedFlow, *, time_bins: tuple[float, ...],
                   temporal_patch: int, group: str = "dit") -> Callable[[TrainState, Batch, jax.Array], jax.Array]:
    """Returns eval_step(state, batch, rng) -> loss per time bin [len(time_bins)], EMA weights.

    The loss depends strongly on t, so a fixed set of times (and a fixed rng) makes validation
    losses comparable across steps and runs.
    """
    bins = jnp.asarray(time_bins, jnp.float32)

    def eval_step(state: TrainState, batch: Batch, rng: jax.Array) -> jax.Array:
        params = state.groups[group].inference_params
        x0 = batch["latent"]
        batch_size, frames = x0.shape[:2]
        noise = jax.random.normal(rng, x0.shape, x0.dtype)
        no_drop = jnp.zeros((batch_size,), bool)

        def loss_at(t_value):
            t = jnp.full((batch_size, frames // temporal_patch), t_value)
            prediction = _forward(model, params, batch, flow.interpolate(x0, noise, t), t, no_drop)
            return jnp.mean(flow.loss(prediction, x0, noise, t))

        return jax.lax.map(loss_at, bins)

    return eval_step


def make_packed_eval_step(model: nn.Module, flow: RectifiedFlow, *, time_bins: tuple[float, ...],
                          group: str = "dit") -> Callable[[TrainState, Batch, jax.Array], jax.Array]:
    """`make_eval_step` for packed batches: the loss over the clips' tokens per time bin."""
    bins = jnp.asarray(time_bins, jnp.float32)

    def eval_step(state: TrainState, batch: Batch, rng: jax.Array) -> jax.Array:
        params = state.groups[group].inference_params
        noise = jax.random.normal(rng, batch["tokens"].shape, batch["tokens"].dtype)
        no_drop = jnp.zeros(batch["text_mask"].shape[:2], bool)

        def loss_at(t_value):
            t = jnp.full(batch["slot_clip"].shape, t_value)
            return packed_flow_loss(model, flow, params,
                                    {**batch, "t": t, "noise": noise, "drop_text": no_drop})

        return jax.lax.map(loss_at, bins)

    return eval_step
