"""Samplers that integrate the flow from noise (t = 1) to data (t = 0).

The whole loop runs inside one `jax.lax.fori_loop`, so a sampler compiles once per shape rather
than once per step. Classifier-free guidance runs the conditional and unconditional branches in
one batched forward pass.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from sora_jax.diffusion.flow import RectifiedFlow, expand_time, shift_time

# (x_t [B,T,H,W,C], t [B,Tt], drop_text bool [B]) -> network prediction, same shape as x_t.
Denoiser = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def time_grid(steps: int, shift: float) -> jax.Array:
    """Times from 1 to 0 in `steps` Euler steps, denser near t = 1 when shift > 1: [steps + 1]."""
    return shift_time(jnp.linspace(1.0, 0.0, steps + 1), shift)


def guided_velocity(flow: RectifiedFlow, denoise: Denoiser, x, t, guidance: float):
    """Velocity with classifier-free guidance: v_u + g * (v_c - v_u); g = 1 is plain conditional."""
    batch = x.shape[0]
    if guidance == 1.0:
        return flow.to_velocity(denoise(x, t, jnp.zeros((batch,), bool)), x, t)
    drop = jnp.concatenate([jnp.zeros((batch,), bool), jnp.ones((batch,), bool)])
    x2, t2 = jnp.concatenate([x, x]), jnp.concatenate([t, t])
    v_cond, v_uncond = jnp.split(flow.to_velocity(denoise(x2, t2, drop), x2, t2), 2)
    return v_uncond + guidance * (v_cond - v_uncond)


def euler_sample(
    flow: RectifiedFlow,
    denoise: Denoiser,
    noise: jax.Array,
    *,
    steps: int,
    guidance: float = 1.0,
    shift: float | None = None,
    temporal_patch: int = 1,
    given: jax.Array | None = None,
    given_mask: jax.Array | None = None,
) -> jax.Array:
    """Euler integration of the (guided) flow ODE from `noise` to a sample.

    Args:
      flow: the objective the denoiser was trained with.
      denoise: the network, closed over its parameters and text.
      noise: x at t = 1, [B, T, H, W, C].
      steps: number of Euler steps.
      guidance: classifier-free guidance scale.
      shift: time shift of the grid (defaults to the training shift).
      temporal_patch: frames per temporal token position (pt).
      given: optional clean frames [B, T, H, W, C] to condition on, with
      given_mask: bool [B, T // pt], True where a frame group is given (kept at t = 0).
    Returns:
      The sample at t = 0, [B, T, H, W, C].
    """
    batch, frames = noise.shape[:2]
    grid = time_grid(steps, flow.shift if shift is None else shift)
    groups = frames // temporal_patch
    if given_mask is None:
        given_mask = jnp.zeros((batch, groups), bool)
        given = jnp.zeros_like(noise)
    keep = expand_time(given_mask.astype(noise.dtype), noise)

    def step(i, x):
        x = keep * given + (1.0 - keep) * x
        t = jnp.where(given_mask, 0.0, jnp.full((batch, groups), grid[i]))
        v = guided_velocity(flow, denoise, x, t, guidance)
        return x + (grid[i + 1] - grid[i]) * v

    x = jax.lax.fori_loop(0, steps, step, noise.astype(jnp.float32))
    return keep * given + (1.0 - keep) * x
