"""Autoencoders that map videos to the latent space the DiT generates in.

Every autoencoder has the same interface: `encode(params, video) -> latent` and
`decode(params, latent) -> video`, with videos `[B, T, H, W, 3]` in [-1, 1] and latents
`[B, 1 + (T - 1) // s_t, H // s_s, W // s_s, latent_channels]`. A video of 1 + k * s_t frames maps
to 1 + k latent frames, so an image (T = 1) is a one-frame video.

`IdentityAutoencoder` is the pixel-space member of the family: the DiT then diffuses pixels
directly.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax


@dataclasses.dataclass(frozen=True)
class IdentityAutoencoder:
    """Pixel space: latents are the video itself."""

    channels: int = 3
    temporal_compression: int = 1
    spatial_compression: int = 1

    @property
    def latent_channels(self) -> int:
        return self.channels

    def init_params(self) -> Any:
        return {}

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        return (frames, height, width, self.channels)

    def encode(self, params, video: jax.Array) -> jax.Array:
        del params
        return video

    def decode(self, params, latent: jax.Array) -> jax.Array:
        del params
        return latent


def get_autoencoder(kind: str, **kwargs) -> IdentityAutoencoder:
    """Builds the autoencoder named by `config.autoencoder.kind`."""
    kinds = {"identity": IdentityAutoencoder}
    if kind not in kinds:
        raise ValueError(f"Unknown autoencoder kind {kind!r}; valid kinds: {sorted(kinds)}.")
    return kinds[kind](**kwargs)
