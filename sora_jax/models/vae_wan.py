"""The Wan 2.1 video VAE (diffusers' `AutoencoderKLWan`) in flax, and a loader for its checkpoints.

    vae, params = load_wan_vae("Wan2.1-T2V-1.3B-Diffusers/vae")
    latent = vae.encode(params, video)   # [B, 1 + 4k, H, W, 3] in [-1, 1] -> [B, 1 + k, H/8, W/8, 16]
    video = vae.decode(params, latent)

`WanVAE` has the autoencoder interface of `sora_jax.models.vae`: channel-last videos and latents,
latents normalised per channel as diffusers' Wan pipelines do, `(mean - latents_mean) / latents_std`
with the statistics of the checkpoint's config.json. `encode_raw` / `decode_raw` skip that step.

The network is causal in time and built on `CausalConv3d`. diffusers always runs it in chunks (the
first frame, then 4 frames at a time to encode; one latent frame at a time to decode), carrying past
frames in a feature cache, and its temporal resampling layers treat the clip's first chunk apart:
  * time downsampling passes the first frame through and applies a stride-2 time convolution without
    padding to the rest: output frame j >= 1 sees input frames 2j - 2, 2j - 1, 2j;
  * time upsampling passes the first frame through as one frame and turns every later frame into two
    with a causal time convolution whose past before frame 1 is zeros (not frame 0).
The layers here compute the same on a whole clip, so `encode` / `decode` equal diffusers' `encode`
(posterior mean) / `decode`, and in chunks with a flax 'cache' collection (`encode_chunked` /
`decode_chunked`, whose default chunks are diffusers' for the released 4x temporal compression).

Covered: the Wan 2.1 architecture (not Wan 2.2's residual, patchified VAE), for inference (dropout is
left out; decoding clips to [-1, 1] as diffusers does). Flax modules are named after diffusers' ones,
a list index written `_3` for `.3`, so checkpoint names map one to one; torch kernels
[out, in, *k] become flax's [*k, in, out].
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sora_jax.models import diffusers_io
from sora_jax.models.attention import attention
from sora_jax.models.vae import CausalConv3d, chunk_bounds, run_chunked, check_video

WEIGHTS_NAME, INDEX_NAME = diffusers_io.WEIGHTS_NAME, diffusers_io.INDEX_NAME
_CLASS_NAME = "AutoencoderKLWan"

# Layers -------------------------------------------------------------------------------------------


class WanRMSNorm(nn.Module):
    """x / |x| * sqrt(C) * gamma, the norm taken over channels at each pixel; computed in float32."""

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        gamma = self.param("gamma", nn.initializers.ones, (channels,))
        y = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(jnp.square(y), axis=-1, keepdims=True))
        return (y / jnp.maximum(norm, 1e-12) * math.sqrt(channels) * gamma).astype(x.dtype)


class WanResidualBlock(nn.Module):
    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.silu(WanRMSNorm(name="norm1")(x))
        h = CausalConv3d(self.features, dtype=self.dtype, name="conv1")(h)
        h = nn.silu(WanRMSNorm(name="norm2")(h))
        h = CausalConv3d(self.features, dtype=self.dtype, name="conv2")(h)
        if x.shape[-1] != self.features:
            x = CausalConv3d(self.features, (1, 1, 1), dtype=self.dtype, name="conv_shortcut")(x)
        return x + h


class WanAttention(nn.Module):
    """Single-head self-attention over the pixels of each frame, with a residual."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, t, h, w, c = x.shape
        y = WanRMSNorm(name="norm")(x)
        qkv = nn.Conv(3 * c, (1, 1), dtype=self.dtype, name="to_qkv")(y)
        q, k, v = jnp.split(qkv.reshape(b * t, h * w, 1, 3 * c), 3, axis=-1)
        y = attention(q, k, v, backend="xla").reshape(b, t, h, w, c)
        return x + nn.Conv(c, (1, 1), dtype=self.dtype, name="proj")(y)


class WanMidBlock(nn.Module):
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        x = WanResidualBlock(width, self.dtype, name="resnets_0")(x)
        x = WanAttention(self.dtype, name="attentions_0")(x)
        return WanResidualBlock(width, self.dtype, name="resnets_1")(x)


def _first_chunk(module: nn.Module) -> bool:
    """Whether `module` sees the clip's first frames: true on a whole clip (no cache) and on the first
    chunk of a chunked run, which marks the 'cache' collection so that later chunks see false."""
    if module.has_variable("cache", "started"):
        return False
    if module.is_mutable_collection("cache"):
        module.put_variable("cache", "started", jnp.ones((), jnp.bool_))
    return True


class WanDownsample(nn.Module):
    """Halves H and W with a strided conv on each frame; where `temporal`, then T (1 + 2k -> 1 + k)
    with a stride-2 time conv that passes the first frame through."""

    temporal: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        x = nn.Conv(width, (3, 3), strides=(2, 2), padding=((0, 1), (0, 1)), dtype=self.dtype,
                    name="resample_1")(x)
        if not self.temporal:
            return x
        first = _first_chunk(self)
        y = CausalConv3d(width, (3, 1, 1), (2, 1, 1), dtype=self.dtype, name="time_conv")(x)
        # On the first frame the conv would see two frames of zero padding: the frame is kept instead.
        return jnp.concatenate([x[:, :1], y[:, 1:]], axis=1) if first else y


class WanUpsample(nn.Module):
    """Where `temporal`, doubles T (1 + k -> 1 + 2k) with a causal time conv giving two frames per
    frame, the first frame passing through as one; then doubles H and W (nearest) and convolves."""

    features: int
    temporal: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.temporal:
            b, t, h, w, c = x.shape
            first = _first_chunk(self)
            # The conv's past before frame 1 is zeros, not frame 0, whose own output is dropped.
            past = jnp.concatenate([jnp.zeros_like(x[:, :1]), x[:, 1:]], axis=1) if first else x
            y = CausalConv3d(2 * c, (3, 1, 1), dtype=self.dtype, name="time_conv")(past)
            y = y.reshape(b, t, h, w, 2, c).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, c)
            x = jnp.concatenate([x[:, :1], y[:, 2:]], axis=1) if first else y
        x = x.repeat(2, axis=2).repeat(2, axis=3)
        return nn.Conv(self.features, (3, 3), padding=1, dtype=self.dtype, name="resample_1")(x)


class WanUpBlock(nn.Module):
    features: int
    num_res_blocks: int
    upsample: bool
    temporal: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for j in range(self.num_res_blocks + 1):
            x = WanResidualBlock(self.features, self.dtype, name=f"resnets_{j}")(x)
        if self.upsample:
            x = WanUpsample(self.features // 2, self.temporal, self.dtype, name="upsamplers_0")(x)
        return x


# Encoder, decoder ---------------------------------------------------------------------------------


class WanEncoder(nn.Module):
    """[B, T, H, W, C] -> posterior moments [B, 1 + (T - 1) // s_t, H // s_s, W // s_s, 2 * z_dim]."""

    base_dim: int
    z_dim: int
    dim_mult: Sequence[int]
    num_res_blocks: int
    temperal_downsample: Sequence[bool]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = CausalConv3d(self.base_dim, dtype=self.dtype, name="conv_in")(x.astype(self.dtype))
        n = 0
        for i, mult in enumerate(self.dim_mult):
            for _ in range(self.num_res_blocks):
                x = WanResidualBlock(self.base_dim * mult, self.dtype, name=f"down_blocks_{n}")(x)
                n += 1
            if i < len(self.dim_mult) - 1:
                x = WanDownsample(self.temperal_downsample[i], self.dtype, name=f"down_blocks_{n}")(x)
                n += 1
        x = WanMidBlock(self.dtype, name="mid_block")(x)
        x = nn.silu(WanRMSNorm(name="norm_out")(x))
        return CausalConv3d(2 * self.z_dim, dtype=self.dtype, name="conv_out")(x)


class WanDecoder(nn.Module):
    """[B, t, h, w, z_dim] -> [B, 1 + (t - 1) * s_t, h * s_s, w * s_s, out_channels] (float32)."""

    base_dim: int
    dim_mult: Sequence[int]
    num_res_blocks: int
    temperal_upsample: Sequence[bool]
    out_channels: int = 3
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z):
        mults = self.dim_mult[::-1]
        x = CausalConv3d(self.base_dim * mults[0], dtype=self.dtype, name="conv_in")(z.astype(self.dtype))
        x = WanMidBlock(self.dtype, name="mid_block")(x)
        for i, mult in enumerate(mults):
            upsample = i < len(mults) - 1
            x = WanUpBlock(self.base_dim * mult, self.num_res_blocks, upsample,
                           upsample and self.temperal_upsample[i], self.dtype, name=f"up_blocks_{i}")(x)
        x = nn.silu(WanRMSNorm(name="norm_out")(x))
        return CausalConv3d(self.out_channels, dtype=self.dtype, name="conv_out")(x).astype(jnp.float32)


class WanVAENet(nn.Module):
    """The whole network: `encode` gives the posterior mean, `decode` pixels clipped to [-1, 1]."""

    base_dim: int
    decoder_base_dim: int
    z_dim: int
    dim_mult: tuple[int, ...]
    num_res_blocks: int
    temperal_downsample: tuple[bool, ...]
    out_channels: int = 3
    dtype: Any = jnp.float32

    def setup(self):
        self.encoder = WanEncoder(self.base_dim, self.z_dim, self.dim_mult, self.num_res_blocks,
                                  self.temperal_downsample, self.dtype)
        self.quant_conv = CausalConv3d(2 * self.z_dim, (1, 1, 1), dtype=self.dtype)
        self.post_quant_conv = CausalConv3d(self.z_dim, (1, 1, 1), dtype=self.dtype)
        self.decoder = WanDecoder(self.decoder_base_dim, self.dim_mult, self.num_res_blocks,
                                  self.temperal_downsample[::-1], self.out_channels, self.dtype)

    def encode(self, video):
        moments = self.quant_conv(self.encoder(video)).astype(jnp.float32)
        return moments[..., :self.z_dim]

    def decode(self, z):
        return jnp.clip(self.decoder(self.post_quant_conv(z.astype(self.dtype))), -1.0, 1.0)

    def __call__(self, video):
        return self.decode(self.encode(video))


# The autoencoder interface ------------------------------------------------------------------------

_REQUIRED = ("base_dim", "z_dim", "dim_mult", "num_res_blocks", "temperal_downsample", "latents_mean",
             "latents_std")


def _check_config(config: dict) -> None:
    missing = [key for key in _REQUIRED if key not in config]
    if missing:
        raise ValueError(f"The Wan VAE config lacks {missing}; it needs {list(_REQUIRED)} "
                         f"(the keys of a diffusers AutoencoderKLWan config.json).")
    if config.get("is_residual") or config.get("patch_size") is not None:
        raise ValueError("This config is a Wan 2.2 VAE (is_residual / patch_size set); only the "
                         "Wan 2.1 architecture is supported.")
    if config.get("attn_scales"):
        raise ValueError(f"attn_scales={config['attn_scales']}: attention in the encoder's levels is not "
                         "supported (diffusers' AutoencoderKLWan cannot encode with it either); Wan 2.1 "
                         "has attn_scales=[].")
    if len(config["temperal_downsample"]) != len(config["dim_mult"]) - 1:
        raise ValueError(f"temperal_downsample={config['temperal_downsample']} needs one entry per "
                         f"downsampling level: len(dim_mult) - 1 = {len(config['dim_mult']) - 1}.")
    for key in ("latents_mean", "latents_std"):
        if len(config[key]) != config["z_dim"]:
            raise ValueError(f"{key} has {len(config[key])} entries, z_dim={config['z_dim']}.")


@dataclasses.dataclass(frozen=True)
class WanVAE:
    """The Wan 2.1 VAE behind the autoencoder interface; `config` is diffusers' config.json content
    and params the flax parameters of `net` (as `load_wan_vae` returns them)."""

    config: dict
    dtype: Any = jnp.float32

    def __post_init__(self):
        _check_config(self.config)

    @property
    def temporal_compression(self) -> int:
        return 2 ** sum(map(bool, self.config["temperal_downsample"]))

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.config["dim_mult"]) - 1)

    @property
    def latent_channels(self) -> int:
        return self.config["z_dim"]

    @property
    def net(self) -> WanVAENet:
        c = self.config
        return WanVAENet(
            base_dim=c["base_dim"], decoder_base_dim=c.get("decoder_base_dim") or c["base_dim"],
            z_dim=c["z_dim"], dim_mult=tuple(c["dim_mult"]), num_res_blocks=c["num_res_blocks"],
            temperal_downsample=tuple(map(bool, c["temperal_downsample"])),
            out_channels=c.get("out_channels", 3), dtype=jnp.dtype(self.dtype))

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        check_video((1, frames, height, width, 3), self.temporal_compression, self.spatial_compression)
        s = self.spatial_compression
        return (1 + (frames - 1) // self.temporal_compression, height // s, width // s,
                self.latent_channels)

    def _normalise(self, mean: jax.Array) -> jax.Array:
        return (mean - jnp.asarray(self.config["latents_mean"], jnp.float32)) / jnp.asarray(
            self.config["latents_std"], jnp.float32)

    def _denormalise(self, latent: jax.Array) -> jax.Array:
        return latent * jnp.asarray(self.config["latents_std"], jnp.float32) + jnp.asarray(
            self.config["latents_mean"], jnp.float32)

    def _check_video(self, video: jax.Array) -> None:
        check_video(video.shape, self.temporal_compression, self.spatial_compression,
                    channels=self.config.get("in_channels", 3))

    def encode_raw(self, params, video: jax.Array) -> jax.Array:
        """The posterior mean, as diffusers' `encode(video).latent_dist.mode()`."""
        self._check_video(video)
        return self.net.apply({"params": params}, video, method=WanVAENet.encode)

    def decode_raw(self, params, z: jax.Array) -> jax.Array:
        """Pixels in [-1, 1], as diffusers' `decode(z).sample`."""
        return self.net.apply({"params": params}, z, method=WanVAENet.decode)

    def encode(self, params, video: jax.Array) -> jax.Array:
        """Normalised posterior mean: what the DiT generates."""
        return self._normalise(self.encode_raw(params, video))

    def decode(self, params, latent: jax.Array) -> jax.Array:
        return self.decode_raw(params, self._denormalise(latent))

    # Long videos ----------------------------------------------------------------------------------

    def encode_chunked(self, params, video: jax.Array, *, chunk_latent_frames: int = 1) -> jax.Array:
        """`encode` a few latent frames at a time, carrying the causal cache: equal to `encode`, with
        activation memory bounded by the chunk. The first chunk is 1 + (n - 1) * s_t frames, later
        ones n * s_t (n = chunk_latent_frames; n = 1 is diffusers' schedule)."""
        self._check_video(video)
        s, n = self.temporal_compression, chunk_latent_frames
        bounds = chunk_bounds(video.shape[1], first=1 + (n - 1) * s, rest=n * s)
        means = run_chunked(self.net, params, WanVAENet.encode, video, bounds)
        return self._normalise(jnp.concatenate(means, axis=1))

    def decode_chunked(self, params, latent: jax.Array, *, chunk_latent_frames: int = 1,
                       to_host: bool = False) -> jax.Array | np.ndarray:
        """`decode` chunk_latent_frames latent frames at a time (1, diffusers' schedule, by default),
        carrying the causal cache. Equal to `decode`; with to_host=True each decoded chunk is moved to
        host memory as it is produced."""
        bounds = chunk_bounds(latent.shape[1], first=chunk_latent_frames, rest=chunk_latent_frames)
        chunks = run_chunked(self.net, params, WanVAENet.decode, self._denormalise(latent), bounds,
                          to_host=to_host)
        return (np.concatenate if to_host else jnp.concatenate)(chunks, axis=1)


# Loading diffusers checkpoints --------------------------------------------------------------------


def load_wan_vae(path: str | pathlib.Path, dtype: Any = jnp.float32) -> tuple[WanVAE, Any]:
    """Reads a diffusers `AutoencoderKLWan` folder (config.json and diffusion_pytorch_model.safetensors,
    or shards listed in diffusion_pytorch_model.safetensors.index.json), e.g. the `vae` subfolder of a
    Wan 2.1 diffusers pipeline. Returns the autoencoder and its parameters, as `dtype` arrays."""
    folder = pathlib.Path(path)
    vae = WanVAE(diffusers_io.read_config(folder, _CLASS_NAME), dtype)
    s = vae.spatial_compression
    shapes = diffusers_io.param_shapes(vae.net, (1, 1, s, s, vae.config.get("in_channels", 3)))
    return vae, diffusers_io.read_params(folder, shapes, _CLASS_NAME, dtype, _torch_name, _torch_shape)


def _torch_name(path: tuple[str, ...]) -> str:
    """('decoder', 'up_blocks_0', 'upsamplers_0', 'time_conv', 'conv', 'kernel') ->
    'decoder.up_blocks.0.upsamplers.0.time_conv.weight' ('conv' is CausalConv3d's inner layer)."""
    return diffusers_io.torch_name(tuple(module for module in path if module != "conv"))


def _torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """The checkpoint shape of a flax parameter: norm gammas carry trailing unit axes, [C, 1, 1] in
    attention and [C, 1, 1, 1] elsewhere."""
    if path[-1] == "gamma":
        return shape + (1,) * (2 if any(m.startswith("attentions_") for m in path) else 3)
    return diffusers_io.torch_shape(path, shape)
