"""Rectified flow (flow matching) between data and Gaussian noise.

Convention: x_t = (1 - t) * x_0 + t * noise, with t in [0, 1]; t = 0 is clean data, t = 1 pure
noise, and the velocity dx_t/dt = noise - x_0. Timesteps are given per temporal token position
(`t: [batch, frames // pt]`), so clean conditioning frames (t = 0) and noisy frames share one
sequence; packed token rows take times already gathered per token (see `expand_time`). Whatever the
network predicts (velocity, clean sample or noise), the loss is measured in velocity space, so the
objective is the same and only the parameterisation changes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

PREDICTIONS = ("velocity", "clean", "noise")
TIMESTEP_SAMPLINGS = ("logit_normal", "uniform")


def shift_time(t: jax.Array, shift: float) -> jax.Array:
    """Warps t towards the noise end: more signal needs more noise to be destroyed.

    shift > 1 spends more of training and sampling at high noise, which larger (more redundant)
    inputs need; shift = 1 is the identity.
    """
    return shift * t / (1.0 + (shift - 1.0) * t)


def resolution_shift(num_values: int, base_values: int, base_shift: float = 1.0) -> float:
    """Shift that keeps the signal-to-noise ratio per value comparable across input sizes."""
    return base_shift * (num_values / base_values) ** 0.5


def expand_time(t: jax.Array, x: jax.Array) -> jax.Array:
    """Broadcasts per-temporal-position times t: [B, Tt] against x: [B, T, H, W, C] (T = Tt * pt).

    A t of x's rank is already per value (e.g. [B, L, 1] for packed tokens [B, L, P]) and is returned
    as it is.
    """
    if t.ndim == x.ndim:
        return t
    repeat = x.shape[1] // t.shape[1]
    if repeat * t.shape[1] != x.shape[1]:
        raise ValueError(f"{x.shape[1]} frames cannot be split into {t.shape[1]} timestep groups.")
    return jnp.repeat(t, repeat, axis=1)[:, :, None, None, None]


@dataclasses.dataclass(frozen=True)
class RectifiedFlow:
    """The flow-matching objective and the conversions between its parameterisations.

    Attributes:
      prediction: what the network outputs: 'velocity', 'clean' (x_0) or 'noise'.
      timestep_sampling: 'logit_normal' (t = sigmoid(N(mean, std))) or 'uniform'.
      logit_mean, logit_std: parameters of the logit-normal distribution.
      shift: time shift applied to sampled training times (and used by samplers).
      min_denominator: floor on t (clean) or 1 - t (noise) when converting to velocity, which
        otherwise divides by zero at the ends of the path.
    """

    prediction: str = "velocity"
    timestep_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0
    min_denominator: float = 0.05

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"Unknown prediction {self.prediction!r}; valid: {PREDICTIONS}.")
        if self.timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(
                f"Unknown timestep_sampling {self.timestep_sampling!r}; valid: {TIMESTEP_SAMPLINGS}.")
        if self.shift <= 0:
            raise ValueError(f"shift must be positive, got {self.shift}.")

    def sample_time(self, rng: jax.Array, batch: int) -> jax.Array:
        """One training time per example: [batch]."""
        if self.timestep_sampling == "logit_normal":
            t = jax.nn.sigmoid(self.logit_mean + self.logit_std * jax.random.normal(rng, (batch,)))
        else:
            t = jax.random.uniform(rng, (batch,))
        return shift_time(t, self.shift)

    def interpolate(self, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
        """x_t for per-temporal-position times t: [B, Tt]."""
        t = expand_time(t, x0)
        return (1.0 - t) * x0 + t * noise

    def to_velocity(self, prediction: jax.Array, x_t: jax.Array, t: jax.Array) -> jax.Array:
        """Converts the network output to a velocity estimate; t: [B, Tt]."""
        prediction = prediction.astype(jnp.float32)
        t = expand_time(t, x_t)
        if self.prediction == "velocity":
            return prediction
        if self.prediction == "clean":
            return (x_t - prediction) / jnp.maximum(t, self.min_denominator)
        return (prediction - x_t) / jnp.maximum(1.0 - t, self.min_denominator)

    def loss(self, prediction, x0, noise, t, generate_mask=None) -> jax.Array:
        """Mean squared velocity error per example: [B].

        Args:
          prediction: network output for x_t, [B, T, H, W, C].
          x0, noise: the clean sample and the noise that made x_t.
          t: [B, Tt] per-temporal-position times.
          generate_mask: optional bool [B, Tt]; False marks given (conditioning) frames, which are
            excluded from the loss.
        """
        x_t = self.interpolate(x0, noise, t)
        error = jnp.square(self.to_velocity(prediction, x_t, t) - (noise - x0))
        if generate_mask is None:
            return jnp.mean(error, axis=tuple(range(1, error.ndim)))
        weight = expand_time(generate_mask.astype(jnp.float32), x0)
        per_value = jnp.sum(error * weight, axis=tuple(range(1, error.ndim)))
        count = jnp.sum(jnp.broadcast_to(weight, error.shape), axis=tuple(range(1, error.ndim)))
        return per_value / jnp.maximum(count, 1.0)
