"""Samplers that integrate the flow from noise (t = 1) to data (t = 0).

The whole loop runs inside one `jax.lax.fori_loop`, so a sampler compiles once per shape rather
than once per step. Classifier-free guidance runs the conditional and unconditional branches in
one batched forward pass; `Guidance` holds its scale, rescale and interval.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from sora_jax.diffusion.flow import RectifiedFlow, expand_time, shift_time

# (x_t [B,T,H,W,C], t [B,Tt], cond) -> network prediction, same shape as x_t. `cond` is any pytree
# of [B, ...] arrays (for the DiT: caption tokens, their mask, drop-caption flags); guidance
# concatenates a conditional and an unconditional one along the batch.
Denoiser = Callable[[jax.Array, jax.Array, Any], jax.Array]


@dataclasses.dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance settings.

    Attributes:
      scale: g in v_u + g * (v_c - v_u); 1 is the conditional prediction alone (no unconditional
        pass), 0 the unconditional one.
      rescale: phi of Lin et al. 2023 (sec. 3.4): the guided velocity, scaled to the conditional
        velocity's per-sample std, is mixed in with weight phi; 0 is plain guidance.
      interval: (lo, hi): guide only while lo <= t <= hi (Kynkaanniemi et al. 2024); other steps use
        the conditional prediction alone and skip the unconditional pass. (0, 1) always guides.
    """

    scale: float = 1.0
    rescale: float = 0.0
    interval: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self):
        if not self.scale >= 0.0:
            raise ValueError(f"Guidance scale must be >= 0, got {self.scale}.")
        if not 0.0 <= self.rescale <= 1.0:
            raise ValueError(f"Guidance rescale must be in [0, 1], got {self.rescale}.")
        interval = self.interval
        if not (isinstance(interval, (tuple, list)) and len(interval) == 2
                and 0.0 <= interval[0] < interval[1] <= 1.0):
            raise ValueError(f"Guidance interval must be (lo, hi) with 0 <= lo < hi <= 1, "
                             f"got {interval}.")
        object.__setattr__(self, "interval", (float(interval[0]), float(interval[1])))

    @property
    def needs_unconditional(self) -> bool:
        return self.scale != 1.0


def time_grid(steps: int, shift: float) -> jax.Array:
    """Times from 1 to 0 in `steps` Euler steps, denser near t = 1 when shift > 1: [steps + 1]."""
    return shift_time(jnp.linspace(1.0, 0.0, steps + 1), shift)


def per_sample_std(x: jax.Array, weight: jax.Array | None = None) -> jax.Array:
    """Std of each sample's values where `weight` (broadcastable to x, 0 or 1) is 1: [B, 1, ...]."""
    axes = tuple(range(1, x.ndim))
    if weight is None:
        return jnp.std(x, axis=axes, keepdims=True)
    weight = jnp.broadcast_to(weight, x.shape)
    count = jnp.maximum(jnp.sum(weight, axis=axes, keepdims=True), 1.0)
    mean = jnp.sum(weight * x, axis=axes, keepdims=True) / count
    return jnp.sqrt(jnp.sum(weight * jnp.square(x - mean), axis=axes, keepdims=True) / count)


def guide(v_cond: jax.Array, v_uncond: jax.Array, guidance: Guidance,
          weight: jax.Array | None = None) -> jax.Array:
    """Guided velocity from the conditional and unconditional ones, [B, T, H, W, C].

    The rescale acts on the velocity: it is what the ODE integrates (the analogue of the
    v-prediction Lin et al. rescale) and guidance combines in velocity space too, so the result
    does not depend on whether the network predicts velocity, clean sample or noise.
    weight: optional, broadcastable to v, 1 where values count for the std (0 at given frames,
      whose velocity is discarded and, at t = 0, on another scale).
    """
    guided = v_uncond + guidance.scale * (v_cond - v_uncond)
    if guidance.rescale == 0.0:
        return guided
    # The floor keeps an all-zero guided velocity at zero instead of NaN.
    ratio = per_sample_std(v_cond, weight) / jnp.maximum(per_sample_std(guided, weight), 1e-12)
    return guidance.rescale * ratio * guided + (1.0 - guidance.rescale) * guided


def guided_velocity(flow: RectifiedFlow, denoise: Denoiser, x, t, cond, uncond, guidance: Guidance,
                    weight=None):
    """Guided velocity from one forward pass over the conditional and unconditional inputs."""
    both = lambda a, b: jnp.concatenate([a, b])
    x2, t2 = both(x, x), both(t, t)
    v_cond, v_uncond = jnp.split(flow.to_velocity(denoise(x2, t2, jax.tree.map(both, cond, uncond)),
                                                  x2, t2), 2)
    return guide(v_cond, v_uncond, guidance, weight)


def euler_sample(
    flow: RectifiedFlow,
    denoise: Denoiser,
    noise: jax.Array,
    cond: Any = None,
    uncond: Any = None,
    *,
    steps: int,
    guidance: Guidance = Guidance(),
    shift: float | None = None,
    temporal_patch: int = 1,
    given: jax.Array | None = None,
    given_mask: jax.Array | None = None,
    init: jax.Array | None = None,
    start: jax.Array | int = 0,
    correct: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """Euler integration of the (guided) flow ODE from `noise` to a sample.

    Args:
      flow: the objective the denoiser was trained with.
      denoise: the network, closed over its parameters.
      noise: x at t = 1, [B, T, H, W, C].
      cond: the denoiser's conditioning, a pytree of [B, ...] arrays (None if it takes none).
      uncond: what the unconditional branch sees instead (a null or negative caption), same
        structure; needed when guidance.scale != 1.
      steps: number of Euler steps.
      guidance: classifier-free guidance settings.
      shift: time shift of the grid (defaults to the training shift).
      temporal_patch: frames per temporal token position (pt).
      given: optional clean frames [B, T, H, W, C] to condition on, with
      given_mask: bool [B, T // pt], True where a frame group is given (kept at t = 0).
      init, start: SDEdit: begin at step `start` of the grid (an int, traced or not) from `init`
        [B, T, H, W, C] noised to that step's time, instead of from pure noise at step 0
        (`strength_start` turns a strength into a step).
      correct: optional reconstruction guidance (`pixel_guidance`): maps the step's estimate of the
        clean sample, x0 = x - t v, to a corrected one, from which the velocity is recomputed.
    Returns:
      The sample at t = 0, [B, T, H, W, C].
    """
    batch, frames = noise.shape[:2]
    if guidance.needs_unconditional and uncond is None:
        raise ValueError(f"Guidance scale {guidance.scale} needs an unconditional input (uncond).")
    for name, tree in (("cond", cond), ("uncond", uncond)):
        if any(leaf.shape[:1] != (batch,) for leaf in jax.tree.leaves(tree)):
            raise ValueError(f"Every array of {name} needs the noise's batch size {batch}, got "
                             f"shapes {[leaf.shape for leaf in jax.tree.leaves(tree)]}.")
    grid = time_grid(steps, flow.shift if shift is None else shift)
    groups = frames // temporal_patch
    if given_mask is None:
        given_mask = jnp.zeros((batch, groups), bool)
        given = jnp.zeros_like(noise)
    keep = expand_time(given_mask.astype(noise.dtype), noise)

    def conditional(x, t):
        return flow.to_velocity(denoise(x, t, cond), x, t)

    def guided(x, t):
        return guided_velocity(flow, denoise, x, t, cond, uncond, guidance, weight=1.0 - keep)

    lo, hi = guidance.interval

    def step(i, x):
        x = keep * given + (1.0 - keep) * x
        t = jnp.where(given_mask, 0.0, jnp.full((batch, groups), grid[i]))
        if not guidance.needs_unconditional:
            v = conditional(x, t)
        elif (lo, hi) == (0.0, 1.0):
            v = guided(x, t)
        else:  # only the branch taken runs, so unguided steps cost one forward pass
            v = jax.lax.cond((lo <= grid[i]) & (grid[i] <= hi), guided, conditional, x, t)
        if correct is not None:
            tx = expand_time(t, x)
            x0 = correct(x - tx * v)
            v = jnp.where(tx > 0, (x - x0) / jnp.maximum(tx, 1e-6), v)
        return x + (grid[i + 1] - grid[i]) * v

    x = noise.astype(jnp.float32)
    if init is not None:
        x = flow.interpolate(init.astype(jnp.float32), x, jnp.full((batch, groups), grid[start]))
    x = jax.lax.fori_loop(start, steps, step, x)
    return keep * given + (1.0 - keep) * x


def pixel_guidance(decode: Callable[[jax.Array], jax.Array], target: jax.Array, weight: jax.Array,
                   scale: float) -> Callable[[jax.Array], jax.Array]:
    """Reconstruction guidance (Ho et al. 2022, "Video Diffusion Models", sec. 3.1) for latent
    diffusion: a gradient step on the clean-sample estimate toward given pixels.

    Given latents fix what the DiT sees, but with a causal VAE they do not fix how the generated
    frames decode next to them: a clip's later latents are encoded relative to its earlier frames,
    so latents given after generated ones decode to the given pixels only if the generated ones
    lead into them. This step pulls decode(x0) toward `target` [B, T', H, W, 3] at the frames where
    `weight` [B, T'] is positive: x0 <- x0 - scale * grad 1/2 sum_f weight_f mse_f(decode(x0), target).
    """

    def loss(x0):
        error = jnp.square(decode(x0) - target).mean(axis=(2, 3, 4))
        return 0.5 * jnp.sum(weight * error)

    def correct(x0):
        # A decoder's norms have huge gradients at constant inputs (an untrained DiT's x0): a
        # non-finite gradient leaves x0 as it is rather than poisoning the sample.
        grad = jax.grad(loss)(x0)
        return x0 - scale * jnp.where(jnp.isfinite(grad), grad, 0.0)

    return correct


def strength_start(steps: int, strength: float) -> int:
    """The grid step at which SDEdit with `strength` in (0, 1] starts: strength 1 is pure noise
    (step 0), smaller strengths skip the noisiest steps (at least one step is taken)."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}.")
    return min(steps - 1, steps - round(strength * steps))
