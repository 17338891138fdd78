"""The CogVideoX video VAE (diffusers' `AutoencoderKLCogVideoX`) in Flax, and its weight loader.

CogVideoX's autoencoder compresses videos 4x in time and 8x in space into 16 latent channels. This
module implements it behind the autoencoder interface of `sora_jax.models.vae` (videos
[B, T, H, W, 3] in [-1, 1], channel-last), and `load_cogvideox_vae` reads diffusers-layout weights
(a CogVideoX pipeline's `vae/` folder: config.json with diffusion_pytorch_model.safetensors, or a
sharded diffusion_pytorch_model.safetensors.index.json) with safetensors' numpy API, without torch:

    vae, params = load_cogvideox_vae("CogVideoX-2b/vae")
    latent = vae.encode(params, video)      # [B, 1 + (T - 1) // 4, H // 8, W // 8, 16]
    video = vae.decode(params, latent)

As in diffusers' CogVideoX pipelines, `encode` returns the posterior mean times the config's
`scaling_factor` and `decode` divides by it first; `encode_raw` / `decode_raw` skip the scaling.

The network: causal 3D convolutions whose past is copies of the first frame (`CausalConv3d` with
time_padding='replicate'); group norms whose statistics span the clip's frames and pixels; resnet
blocks; 2x spatial down/upsamplers that on the first log2(s_t) levels also halve/double time by
averaging/repeating pairs of frames, keeping the first frame single when the frame count is odd;
and, in the decoder, norms whose scale and shift are 1x1x1 convolutions of the latent
(`SpatialNorm3D`). Parameter names follow diffusers' (`down_blocks_0/resnets_1/conv1/conv/kernel`
holds `encoder.down_blocks.0.resnets.1.conv1.conv.weight`).

Whole clips and diffusers' frame batches. `encode` / `decode` process the whole clip at once.
diffusers runs its encoder on batches of 8 frames and its decoder on batches of 2 latent frames
(the first batch also takes the remainder, so 49 frames go as 9 + 8 + ... and 13 latent frames as
3 + 2 + ...), carrying each convolution's past frames from batch to batch. Convolutions,
resamplers and the latent resizing of SpatialNorm3D give the same result either way; group norms
do not, as diffusers computes their statistics over one batch. So `encode` equals diffusers' for
T < 16 frames (a single batch) and `decode` for at most 3 latent frames, and differs beyond, by
the group-norm statistics only. `encode_chunked` / `decode_chunked` run diffusers' batches and
equal diffusers at every length.

Frame counts. Like diffusers, the time resamplers keep a first frame single only when the count is
odd, so t latent frames decode to 1 + s_t * (t - 1) frames when t is odd (the inverse of
`latent_shape`) but to s_t * t frames when t is even (5 frames encode to 2 latent frames, which
decode to 8). CogVideoX's pipelines use odd latent counts (49 frames -> 13, 81 -> 21).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sora_jax.models import diffusers_io
from sora_jax.models.vae import CausalConv3d, check_video

WEIGHTS_NAME, INDEX_NAME = diffusers_io.WEIGHTS_NAME, diffusers_io.INDEX_NAME
_CLASS_NAME = "AutoencoderKLCogVideoX"

# diffusers' frame batch sizes (`num_sample_frames_batch_size`, `num_latent_frames_batch_size`).
ENCODER_FRAME_BATCH = 8
DECODER_FRAME_BATCH = 2

# `AutoencoderKLCogVideoX.__init__` defaults, for config.json files that omit a key.
_CONFIG_DEFAULTS = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (128, 256, 256, 512),
    "latent_channels": 16,
    "layers_per_block": 3,
    "act_fn": "silu",
    "norm_eps": 1e-6,
    "norm_num_groups": 32,
    "temporal_compression_ratio": 4,
    "scaling_factor": 1.15258426,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}


# Layers -------------------------------------------------------------------------------------------


def _causal_conv(features: int, dtype: Any, name: str) -> CausalConv3d:
    """CogVideoX's 3x3x3 causal convolution: its past is two copies of the first frame."""
    return CausalConv3d(features, time_padding="replicate", dtype=dtype, name=name)


def _group_norm(x: jax.Array, groups: int, eps: float, name: str) -> jax.Array:
    """torch's GroupNorm on a video: statistics per example and group over all frames, pixels and
    the group's channels, computed in float32."""
    norm = nn.GroupNorm(num_groups=groups, epsilon=eps, use_fast_variance=False,
                        dtype=jnp.float32, name=name)
    return norm(x.astype(jnp.float32)).astype(x.dtype)


def _odd_first(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(first frame, the rest) of an odd number of frames, (no frames, all) of an even number."""
    k = x.shape[1] % 2
    return x[:, :k], x[:, k:]


def _nearest(x: jax.Array, size: Sequence[int]) -> jax.Array:
    """Nearest-neighbour resize of [B, T, H, W, C] to `size` = (T', H', W'): output index i reads
    input index floor(i * in / out), as torch's `F.interpolate(mode='nearest')` (exactly so for
    the integer ratios used here)."""
    for axis, out in zip((1, 2, 3), size):
        if x.shape[axis] != out:
            x = jnp.take(x, np.arange(out) * x.shape[axis] // out, axis=axis)
    return x


class SpatialNorm3D(nn.Module):
    """Group norm of `f`, scaled and shifted per pixel by 1x1x1 convolutions of the latent `zq`
    resized (nearest) to f's frames and size; when f has an odd frame count, zq's first frame is
    resized to f's first frame alone and the rest to the rest."""

    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, f, zq):
        t, h, w, c = f.shape[1:]
        k = t % 2
        zq = jnp.concatenate([_nearest(zq[:, :k], (k, h, w)), _nearest(zq[:, k:], (t - k, h, w))],
                             axis=1)
        scale = CausalConv3d(c, (1, 1, 1), dtype=self.dtype, name="conv_y")(zq)
        shift = CausalConv3d(c, (1, 1, 1), dtype=self.dtype, name="conv_b")(zq)
        return _group_norm(f, self.groups, 1e-6, "norm_layer") * scale + shift


class ResnetBlock(nn.Module):
    """(Norm, SiLU, causal conv) twice, plus the input (through a 1x1x1 conv where the width
    changes). The norms are group norms, or SpatialNorm3D when given the latent `zq` (decoder)."""

    features: int
    groups: int
    eps: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, zq=None):
        def norm(h, name):
            if zq is None:
                return _group_norm(h, self.groups, self.eps, name)
            return SpatialNorm3D(self.groups, self.dtype, name=name)(h, zq)

        h = _causal_conv(self.features, self.dtype, "conv1")(nn.silu(norm(x, "norm1")))
        h = _causal_conv(self.features, self.dtype, "conv2")(nn.silu(norm(h, "norm2")))
        if x.shape[-1] != self.features:
            x = nn.Conv(self.features, (1, 1, 1), dtype=self.dtype, name="conv_shortcut")(x)
        return x + h


class Downsample(nn.Module):
    """Halves H and W with a stride-2 3x3 conv on each frame (zero padding at the bottom and right);
    with `compress_time`, first averages pairs of frames (an odd clip's first frame kept single)."""

    features: int
    compress_time: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.compress_time:
            first, rest = _odd_first(x)
            b, t = rest.shape[:2]
            rest = rest.reshape((b, t // 2, 2) + rest.shape[2:]).mean(axis=2)
            x = jnp.concatenate([first, rest], axis=1)
        return nn.Conv(self.features, (3, 3), strides=(2, 2), padding=((0, 1), (0, 1)),
                       dtype=self.dtype, name="conv")(x)


class Upsample(nn.Module):
    """Doubles H and W by nearest-neighbour repetition, and with `compress_time` T (an odd clip's
    first frame kept single), then applies a 3x3 conv to each frame."""

    features: int
    compress_time: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = x.repeat(2, axis=2).repeat(2, axis=3)
        if self.compress_time:
            first, rest = _odd_first(x)
            x = jnp.concatenate([first, rest.repeat(2, axis=1)], axis=1)
        return nn.Conv(self.features, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                       name="conv")(x)


class Block(nn.Module):
    """A down, mid or up block: `num_layers` resnet blocks, then the resampler, if any."""

    features: int
    num_layers: int
    groups: int
    eps: float = 1e-6
    resample: str | None = None  # 'down', 'up' or None
    compress_time: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, zq=None):
        for i in range(self.num_layers):
            x = ResnetBlock(self.features, self.groups, self.eps, self.dtype,
                            name=f"resnets_{i}")(x, zq)
        if self.resample == "down":
            x = Downsample(self.features, self.compress_time, self.dtype, name="downsamplers_0")(x)
        elif self.resample == "up":
            x = Upsample(self.features, self.compress_time, self.dtype, name="upsamplers_0")(x)
        return x


# Encoder and decoder ------------------------------------------------------------------------------


class Encoder(nn.Module):
    """[B, T, H, W, 3] -> posterior moments [B, t, h, w, 2 * latent_channels] (mean, log-variance).

    Level i has channels[i] channels; every level but the last halves H and W, and the first
    `temporal_levels` of them also T.
    """

    channels: tuple[int, ...]
    layers_per_block: int
    latent_channels: int
    temporal_levels: int
    groups: int
    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = _causal_conv(self.channels[0], self.dtype, "conv_in")(x.astype(self.dtype))
        last = len(self.channels) - 1
        for i, width in enumerate(self.channels):
            x = Block(width, self.layers_per_block, self.groups, self.eps,
                      resample="down" if i < last else None, compress_time=i < self.temporal_levels,
                      dtype=self.dtype, name=f"down_blocks_{i}")(x)
        x = Block(self.channels[-1], 2, self.groups, self.eps, dtype=self.dtype,
                  name="mid_block")(x)
        x = nn.silu(_group_norm(x, self.groups, 1e-6, "norm_out"))
        return _causal_conv(2 * self.latent_channels, self.dtype, "conv_out")(x).astype(jnp.float32)


class Decoder(nn.Module):
    """[B, t, h, w, latent_channels] -> [B, T, H, W, out_channels]: the encoder mirrored, with
    layers_per_block + 1 resnet blocks per level, every norm conditioned on the latent."""

    channels: tuple[int, ...]
    layers_per_block: int
    out_channels: int
    temporal_levels: int
    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z):
        z = z.astype(self.dtype)
        channels = self.channels[::-1]
        x = _causal_conv(channels[0], self.dtype, "conv_in")(z)
        x = Block(channels[0], 2, self.groups, dtype=self.dtype, name="mid_block")(x, z)
        last = len(channels) - 1
        for i, width in enumerate(channels):
            x = Block(width, self.layers_per_block + 1, self.groups,
                      resample="up" if i < last else None, compress_time=i < self.temporal_levels,
                      dtype=self.dtype, name=f"up_blocks_{i}")(x, z)
        x = nn.silu(SpatialNorm3D(self.groups, self.dtype, name="norm_out")(x, z))
        return _causal_conv(self.out_channels, self.dtype, "conv_out")(x).astype(jnp.float32)


class CogVideoXNet(nn.Module):
    """The encoder and decoder: `encode` gives posterior moments, `decode` pixels."""

    channels: tuple[int, ...]
    layers_per_block: int
    latent_channels: int
    temporal_levels: int
    groups: int
    eps: float
    out_channels: int = 3
    dtype: Any = jnp.float32

    def setup(self):
        self.encoder = Encoder(self.channels, self.layers_per_block, self.latent_channels,
                               self.temporal_levels, self.groups, self.eps, self.dtype)
        self.decoder = Decoder(self.channels, self.layers_per_block, self.out_channels,
                               self.temporal_levels, self.groups, self.dtype)

    def encode(self, video):
        """Posterior (mean, logvar), each [B, t, h, w, latent_channels] in float32."""
        mean, logvar = jnp.split(self.encoder(video), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z):
        return self.decoder(z)

    def __call__(self, video):
        """Reconstruction of `video` from the posterior mean."""
        return self.decode(self.encode(video)[0])


# The autoencoder interface ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CogVideoXVAE:
    """diffusers' CogVideoX VAE behind the autoencoder interface of `sora_jax.models.vae`.

    `config` is the diffusers config.json; `params` the `CogVideoXNet` parameters that
    `load_cogvideox_vae` returns; `dtype` the computation dtype (group norms run in float32).
    """

    config: dict
    dtype: Any = jnp.float32

    def __post_init__(self):
        unsupported = {key: self.config[key] for key in ("use_quant_conv", "use_post_quant_conv")
                       if self.config.get(key)}
        if self._get("act_fn") != "silu":
            unsupported["act_fn"] = self._get("act_fn")
        for key, block in (("down_block_types", "CogVideoXDownBlock3D"),
                           ("up_block_types", "CogVideoXUpBlock3D")):
            types = self.config.get(key, [block] * len(self.channels))
            if list(types) != [block] * len(self.channels):
                unsupported[key] = types
        if unsupported:
            raise ValueError(f"CogVideoXVAE does not implement the config options {unsupported} "
                             f"(block_out_channels={list(self.channels)}).")
        ratio = self._get("temporal_compression_ratio")
        levels = len(self.channels) - 1
        if ratio < 1 or 2 ** self.temporal_levels != ratio or self.temporal_levels > levels:
            raise ValueError(
                f"temporal_compression_ratio={ratio} must be a power of 2 of at most 2**{levels}: "
                f"one halving per downsampling level of block_out_channels={list(self.channels)}.")

    def _get(self, key: str) -> Any:
        return self.config.get(key, _CONFIG_DEFAULTS[key])

    @property
    def channels(self) -> tuple[int, ...]:
        return tuple(self._get("block_out_channels"))

    @property
    def temporal_levels(self) -> int:
        return int(math.log2(self._get("temporal_compression_ratio")))

    @property
    def in_channels(self) -> int:
        return int(self._get("in_channels"))

    @property
    def temporal_compression(self) -> int:
        return int(self._get("temporal_compression_ratio"))

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self._get("latent_channels"))

    @property
    def scaling_factor(self) -> float:
        return float(self._get("scaling_factor"))

    @property
    def net(self) -> CogVideoXNet:
        return CogVideoXNet(channels=self.channels, layers_per_block=self._get("layers_per_block"),
                            latent_channels=self.latent_channels,
                            temporal_levels=self.temporal_levels,
                            groups=self._get("norm_num_groups"), eps=self._get("norm_eps"),
                            out_channels=self._get("out_channels"), dtype=self.dtype)

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        self._check_video((1, frames, height, width, self.in_channels))
        s = self.spatial_compression
        return (1 + (frames - 1) // self.temporal_compression, height // s, width // s,
                self.latent_channels)

    def decoded_frames(self, latent_frames: int) -> int:
        """How many frames `decode` makes of `latent_frames` (see "Frame counts" above)."""
        if latent_frames % 2:
            return 1 + (latent_frames - 1) * self.temporal_compression
        return latent_frames * self.temporal_compression

    def moments(self, params, video: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Posterior (mean, logvar) of a whole clip, unscaled."""
        self._check_video(video.shape)
        return self.net.apply({"params": params}, video, method=CogVideoXNet.encode)

    def encode_raw(self, params, video: jax.Array) -> jax.Array:
        """Posterior mean, unscaled: diffusers' `encode(video).latent_dist.mean`."""
        return self.moments(params, video)[0]

    def decode_raw(self, params, z: jax.Array) -> jax.Array:
        """Pixels of an unscaled latent: diffusers' `decode(z).sample`."""
        self._check_latent(z.shape)
        return self.net.apply({"params": params}, z, method=CogVideoXNet.decode)

    def encode(self, params, video: jax.Array) -> jax.Array:
        """Posterior mean times scaling_factor: what the CogVideoX DiT generates."""
        return self.encode_raw(params, video) * self.scaling_factor

    def decode(self, params, latent: jax.Array) -> jax.Array:
        """Pixels [B, T, H, W, 3] of an `encode`-scaled latent; T is `decoded_frames(t)`."""
        return self.decode_raw(params, latent / self.scaling_factor)

    # diffusers' frame batches ---------------------------------------------------------------------

    def encode_chunked(self, params, video: jax.Array) -> jax.Array:
        """`encode` in diffusers' frame batches: equal to diffusers' encoding at any length (group
        norm statistics per batch), with activation memory bounded by the batch."""
        self._check_video(video.shape)
        moments = _run_in_batches(self.net, "encode", params, video, ENCODER_FRAME_BATCH)
        return jnp.concatenate([mean for mean, _ in moments], axis=1) * self.scaling_factor

    def decode_chunked(self, params, latent: jax.Array) -> jax.Array:
        """`decode` in diffusers' batches of latent frames: equal to diffusers' decoding at any
        length."""
        self._check_latent(latent.shape)
        z = latent / self.scaling_factor
        return jnp.concatenate(_run_in_batches(self.net, "decode", params, z, DECODER_FRAME_BATCH),
                               axis=1)

    def _check_video(self, shape: Sequence[int]) -> None:
        check_video(shape, self.temporal_compression, self.spatial_compression,
                    channels=self.in_channels)

    def _check_latent(self, shape: Sequence[int]) -> None:
        if len(shape) != 5 or shape[-1] != self.latent_channels:
            raise ValueError(f"Expected latents [B, t, h, w, {self.latent_channels}], got shape "
                             f"{tuple(shape)}.")


def _frame_batches(frames: int, size: int) -> list[tuple[int, int]]:
    """diffusers' frame batches: `size` frames each, the first also taking the remainder."""
    count = max(frames // size, 1)
    first = frames - (count - 1) * size
    return [(0, first)] + [(first + i * size, first + (i + 1) * size) for i in range(count - 1)]


@functools.cache
def _batch_step(net: CogVideoXNet, method: str):
    """(params, cache, x) -> (output, cache) for one frame batch; jitted once per (net, method)."""
    def step(params, cache, x):
        return net.apply({"params": params, **cache}, x, method=method, mutable=["cache"])
    return jax.jit(step)


def _run_in_batches(net: CogVideoXNet, method: str, params, x: jax.Array, size: int) -> list:
    """Applies `method` to diffusers' frame batches of x, carrying the causal convolutions' past."""
    step, cache, outputs = _batch_step(net, method), {}, []
    for start, stop in _frame_batches(x.shape[1], size):
        out, cache = step(params, cache, x[:, start:stop])
        outputs.append(out)
    return outputs


# Loading diffusers checkpoints --------------------------------------------------------------------


def load_cogvideox_vae(path: str | pathlib.Path, dtype: Any = jnp.float32
                       ) -> tuple[CogVideoXVAE, Any]:
    """Reads a diffusers-layout CogVideoX VAE folder into (CogVideoXVAE, params).

    The folder holds config.json and diffusion_pytorch_model.safetensors, or the shards listed by
    diffusion_pytorch_model.safetensors.index.json (e.g. the `vae/` folder of a CogVideoX pipeline).
    Parameters are returned as jnp arrays of `dtype` (float32, bfloat16 and float16 checkpoints all
    read).

    Raises:
      FileNotFoundError: naming a missing folder, config.json, weights file or shard.
      ValueError: for a config.json of another class, or naming tensors that are missing,
        unexpected or of the wrong shape for the config.
    """
    folder = pathlib.Path(path)
    vae = CogVideoXVAE(diffusers_io.read_config(folder, _CLASS_NAME), dtype)
    s = vae.spatial_compression
    shapes = diffusers_io.param_shapes(vae.net, (1, 1, s, s, vae.in_channels))
    return vae, diffusers_io.read_params(folder, shapes, _CLASS_NAME, dtype)
