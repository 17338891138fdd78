"""A 3D patch discriminator for adversarial video-autoencoder training, and its hinge losses.

The discriminator scores overlapping spacetime patches of a video ([B, T, H, W, 3] in [-1, 1]) as
real or reconstructed; its output is a grid of logits, one per patch. It is not causal: it judges
whole clips.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class PatchDiscriminator3D(nn.Module):
    """Strided 3D convs (H and W halve at every layer, T at the second) with group norm and leaky
    ReLU; logits [B, t, h, w]."""

    widths: Sequence[int] = (32, 64, 128)
    num_groups: int = 8

    @nn.compact
    def __call__(self, video: jax.Array) -> jax.Array:
        x = video.astype(jnp.float32)
        for i, width in enumerate(self.widths):
            stride_t = 2 if i == 1 and x.shape[1] > 1 else 1
            x = nn.Conv(width, (3, 4, 4), strides=(stride_t, 2, 2), padding="SAME",
                        name=f"conv{i}")(x)
            if i > 0:
                x = nn.GroupNorm(num_groups=math.gcd(self.num_groups, width), name=f"norm{i}")(x)
            x = nn.leaky_relu(x, 0.2)
        return nn.Conv(1, (3, 3, 3), padding="SAME", name="logits")(x)[..., 0]


def hinge_discriminator_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    """mean(relu(1 - D(real))) + mean(relu(1 + D(fake))), halved: 0 once the margins hold."""
    return 0.5 * (jnp.mean(nn.relu(1.0 - real_logits)) + jnp.mean(nn.relu(1.0 + fake_logits)))


def generator_loss(fake_logits: jax.Array) -> jax.Array:
    """The autoencoder's adversarial loss: -mean(D(reconstruction))."""
    return -jnp.mean(fake_logits)


def adaptive_weight(reconstruction_grad, adversarial_grad, *, max_weight: float = 1e4) -> jax.Array:
    """||grad of the reconstruction loss|| / ||grad of the adversarial loss|| at the decoder's last
    layer, so the adversarial term neither vanishes nor swamps reconstruction (clipped, no gradient)."""
    norm = lambda g: jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(g)))
    weight = norm(reconstruction_grad) / (norm(adversarial_grad) + 1e-4)
    return jax.lax.stop_gradient(jnp.clip(weight, 0.0, max_weight))
