"""The autoencoder a DiT config names (`config.autoencoder`), declared and then loaded.

    autoencoder = dict(kind='identity')                       # pixel space
    autoencoder = dict(kind='causal_vae', workdir='workdirs/vae_moving_shapes',
                       latent_channels=4, temporal_compression=4, spatial_compression=4)
    autoencoder = dict(kind='wan2.1', path='/ckpt/Wan2.1-T2V-1.3B-Diffusers/vae',
                       latent_channels=16, temporal_compression=4, spatial_compression=8)
    autoencoder = dict(kind='cogvideox', path='/ckpt/CogVideoX-2b/vae',
                       latent_channels=16, temporal_compression=4, spatial_compression=8)

Pretrained VAEs load from the diffusers layout of user-supplied files (config.json and
safetensors in `path`); nothing is downloaded.

The DiT config declares the latent geometry it is built for, so its shapes, shardings and
`jax.eval_shape` need no checkpoint. The weights load on first use (`load_declared`), and a VAE
whose geometry differs from the declaration is refused with both named.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import ml_collections

from sora_jax import paths
from sora_jax.models import vae as vae_lib

KINDS = ("identity", "causal_vae", "wan2.1", "cogvideox")
_LOCATION = {"causal_vae": "workdir", "wan2.1": "path", "cogvideox": "path"}


@dataclasses.dataclass(frozen=True)
class LatentGeometry:
    """What the DiT needs to know of an autoencoder before loading it."""

    latent_channels: int
    temporal_compression: int
    spatial_compression: int

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        vae_lib.check_video((1, frames, height, width, 3), self.temporal_compression,
                            self.spatial_compression)
        s = self.spatial_compression
        return (1 + (frames - 1) // self.temporal_compression, height // s, width // s,
                self.latent_channels)


def declared_autoencoder(config: ml_collections.ConfigDict):
    """The autoencoder's geometry from the DiT config (the identity autoencoder is complete)."""
    kind = config.kind
    if kind == "identity":
        return vae_lib.IdentityAutoencoder()
    if kind in _LOCATION:
        missing = [k for k in (_LOCATION[kind], "latent_channels", "temporal_compression",
                               "spatial_compression") if config.get(k) is None]
        if missing:
            raise ValueError(f"config.autoencoder (kind {kind!r}) needs {missing}: where the VAE "
                             "is and the latent geometry the DiT is built for.")
        return LatentGeometry(config.latent_channels, config.temporal_compression,
                              config.spatial_compression)
    raise ValueError(f"Unknown config.autoencoder.kind {kind!r}; valid: {list(KINDS)}.")


def load_declared(config: ml_collections.ConfigDict, declared) -> tuple[Any, Any]:
    """(autoencoder, params) for the config's autoencoder, checked against its declared geometry."""
    if config.kind == "identity":
        return declared, None
    if config.kind == "causal_vae":
        from sora_jax.training.vae_experiment import load_vae
        vae, params = load_vae(config.workdir, step=config.get("step"))
    elif config.kind == "wan2.1":
        from sora_jax.models.vae_wan import load_wan_vae
        vae, params = load_wan_vae(config.path)
    else:
        from sora_jax.models.vae_cogvideox import load_cogvideox_vae
        vae, params = load_cogvideox_vae(config.path)
    found = LatentGeometry(vae.latent_channels, vae.temporal_compression, vae.spatial_compression)
    if found != declared:
        where = os.fspath(paths.path(config[_LOCATION[config.kind]]))
        raise ValueError(
            f"The VAE in {where} has latent geometry {found}, but the DiT "
            f"config declares {declared} (config.autoencoder). Point config.autoencoder."
            f"{_LOCATION[config.kind]} at a VAE with that geometry, or set config.autoencoder's latent_channels, "
            "temporal_compression and spatial_compression to the VAE's (a new DiT workdir then).")
    return vae, params
