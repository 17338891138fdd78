"""Autoencoders that map videos to the latent space the DiT generates in.

Every autoencoder has the same interface: `encode(params, video) -> latent` and
`decode(params, latent) -> video`, with videos `[B, T, H, W, 3]` in [-1, 1] and latents
`[B, 1 + (T - 1) // s_t, H // s_s, W // s_s, latent_channels]`. A video of 1 + k * s_t frames maps
to 1 + k latent frames, so an image (T = 1) is a one-frame video.

  IdentityAutoencoder   pixel space: the DiT diffuses pixels directly.
  CausalVAE             the causal 3D-convolution video VAE trained by this codebase
                        (`configs/vae_moving_shapes.py`).

The causal VAE's convolutions pad only from the past in time, so the first frame is encoded on its
own and latent frame j depends on pixel frames <= j * s_t only. The same property makes long videos
cheap: `encode_chunked` / `decode_chunked` run a clip a few latent frames at a time, carrying each
convolution's last input frames (a flax 'cache' collection) from chunk to chunk, and give the
whole-clip result with memory that does not grow with the video. `decode_tiled` splits large frames
into overlapping spatial tiles and blends them linearly.

Latents handed to the DiT are normalised per channel, `(mean - shift) / scale`, with shift and scale
measured on training data when the VAE is checkpointed (`latent_statistics`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sora_jax.models.attention import attention

# Causal convolution -------------------------------------------------------------------------------


def _same_padding(kernel: int, stride: int) -> tuple[int, int]:
    """Spatial padding giving ceil(size / stride) outputs, the extra pixel at the end."""
    total = max(kernel - stride, 0)
    return total // 2, total - total // 2


class CausalConv3d(nn.Module):
    """A 3D convolution on [B, T, H, W, C] that pads only from the past in time.

    Output frame i sees input frames <= i * stride_t. Without a cache the past is `kernel_t - 1`
    frames of padding: zeros (`time_padding='zeros'`) or copies of the first frame ('replicate').
    Applied with a mutable 'cache' collection, the layer stores the input frames the next call needs
    (`kernel_t - stride_t` of them) and uses them as its past on that call, so running a clip in
    chunks equals running it whole. A chunk after the first must hold a multiple of stride_t frames.
    """

    features: int
    kernel_size: Sequence[int] = (3, 3, 3)
    strides: Sequence[int] = (1, 1, 1)
    time_padding: str = "zeros"
    use_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kt, kh, kw = self.kernel_size
        st, sh, sw = self.strides
        context = kt - st
        if self.has_variable("cache", "past"):
            x = jnp.concatenate([self.get_variable("cache", "past").astype(x.dtype), x], axis=1)
        elif kt > 1:
            if self.time_padding == "zeros":
                past = jnp.zeros_like(x[:, :1]).repeat(kt - 1, axis=1)
            elif self.time_padding == "replicate":
                past = x[:, :1].repeat(kt - 1, axis=1)
            else:
                raise ValueError(f"time_padding={self.time_padding!r}; valid: 'zeros', 'replicate'.")
            x = jnp.concatenate([past, x], axis=1)
        if (x.shape[1] - kt) % st:
            raise ValueError(
                f"A causal convolution with temporal stride {st} got a chunk that does not tile: "
                f"chunks after the first must hold a multiple of {st} frames.")
        if context > 0 and self.is_mutable_collection("cache"):
            self.put_variable("cache", "past", x[:, x.shape[1] - context:])
        return TemporalTapConv(self.features, (kt, kh, kw), (st, sh, sw), self.use_bias,
                               self.dtype, name="conv")(x)


class TemporalTapConv(nn.Module):
    """A 3D convolution, valid in time and 'same' in space, computed as one batched 2D convolution
    per temporal tap: XLA's 2D convolutions are several times faster than its 3D ones on CPU.
    Parameters are laid out as `nn.Conv`'s: kernel [kt, kh, kw, in, out], bias [out]."""

    features: int
    kernel_size: Sequence[int]
    strides: Sequence[int]
    use_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kt, kh, kw = self.kernel_size
        st, sh, sw = self.strides
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (kt, kh, kw, x.shape[-1], self.features), jnp.float32)
        b, t, h, w, c = x.shape
        frames = (t - kt) // st + 1
        out = 0.0
        for i in range(kt):
            tap = x[:, i:i + st * (frames - 1) + 1:st].reshape((b * frames, h, w, c))
            out = out + jax.lax.conv_general_dilated(
                tap.astype(self.dtype), kernel[i].astype(self.dtype), (sh, sw),
                [_same_padding(kh, sh), _same_padding(kw, sw)],
                dimension_numbers=("NHWC", "HWIO", "NHWC"))
        out = out.reshape((b, frames) + out.shape[1:])
        if self.use_bias:
            out = out + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        return out.astype(self.dtype)


# Building blocks ----------------------------------------------------------------------------------


class FrameGroupNorm(nn.Module):
    """Group norm with statistics per frame (over H, W and the group's channels): it stays causal."""

    num_groups: int = 32

    @nn.compact
    def __call__(self, x):
        b, t = x.shape[:2]
        groups = math.gcd(self.num_groups, x.shape[-1])
        y = nn.GroupNorm(num_groups=groups, epsilon=1e-6, dtype=jnp.float32, name="norm")(
            x.reshape((b * t,) + x.shape[2:]).astype(jnp.float32))
        return y.reshape(x.shape).astype(x.dtype)


class ResBlock(nn.Module):
    features: int
    num_groups: int = 32
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.silu(FrameGroupNorm(self.num_groups, name="norm1")(x))
        h = CausalConv3d(self.features, dtype=self.dtype, name="conv1")(h)
        h = nn.silu(FrameGroupNorm(self.num_groups, name="norm2")(h))
        h = CausalConv3d(self.features, dtype=self.dtype, name="conv2")(h)
        if x.shape[-1] != self.features:
            x = CausalConv3d(self.features, kernel_size=(1, 1, 1), dtype=self.dtype, name="skip")(x)
        return x + h


class FrameAttention(nn.Module):
    """Single-head self-attention over the pixels of each frame (causal in time), with a residual."""

    num_groups: int = 32
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, t, h, w, c = x.shape
        y = FrameGroupNorm(self.num_groups, name="norm")(x).reshape(b * t, h * w, 1, c)
        qkv = nn.Dense(3 * c, dtype=self.dtype, name="qkv")(y)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        y = attention(q, k, v, backend="xla").reshape(b, t, h, w, c)
        return x + nn.Dense(c, dtype=self.dtype, name="out")(y)


class Downsample(nn.Module):
    """Halves H and W where `spatial`, and T (1 + 2k -> 1 + k frames) where `temporal`, with one
    strided causal conv."""

    features: int
    spatial: bool
    temporal: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        s, t = (2 if self.spatial else 1), (2 if self.temporal else 1)
        return CausalConv3d(self.features, (3 if self.temporal else 1, 3, 3), (t, s, s),
                            dtype=self.dtype, name="conv")(x)


class Upsample(nn.Module):
    """Doubles H and W where `spatial`, and T where `temporal` (1 + k -> 1 + 2k: the first frame
    stays single), by nearest-neighbour repetition and a causal conv. In chunked decoding only the
    clip's first chunk starts with the single frame; the 'cache' collection remembers it passed."""

    features: int
    spatial: bool
    temporal: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.spatial:
            x = x.repeat(2, axis=2).repeat(2, axis=3)
        if self.temporal:
            if self.has_variable("cache", "started"):
                x = x.repeat(2, axis=1)
            else:
                x = jnp.concatenate([x[:, :1], x[:, 1:].repeat(2, axis=1)], axis=1)
                if self.is_mutable_collection("cache"):
                    self.put_variable("cache", "started", jnp.ones((), jnp.bool_))
        return CausalConv3d(self.features, dtype=self.dtype, name="conv")(x)


# Encoder and decoder ------------------------------------------------------------------------------


def space_to_depth(x: jax.Array, p: int) -> jax.Array:
    """[B, T, H, W, C] -> [B, T, H/p, W/p, p*p*C]: each p x p pixel patch becomes one position."""
    if p == 1:
        return x
    b, t, h, w, c = x.shape
    x = x.reshape(b, t, h // p, p, w // p, p, c).transpose(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(b, t, h // p, w // p, p * p * c)


def depth_to_space(x: jax.Array, p: int) -> jax.Array:
    """The inverse of `space_to_depth`."""
    if p == 1:
        return x
    b, t, h, w, c = x.shape
    x = x.reshape(b, t, h, w, p, p, c // (p * p)).transpose(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(b, t, h * p, w * p, c // (p * p))


def _resamples(i: int, levels: int, spatial: int, temporal: int) -> tuple[bool, bool]:
    """Whether the resampling after level i acts in space (the first `spatial` of them) and in
    time (the last `temporal`)."""
    return i < spatial, i >= levels - 1 - temporal


class Encoder(nn.Module):
    """[B, T, H, W, 3] -> [B, 1 + (T-1)/s_t, H/s_s, W/s_s, 2 * latent_channels] (mean, log-variance).

    The stem folds each patch_size x patch_size pixel patch into channels (so s_s = patch_size *
    2 ** (levels - 1) and no convolution runs at full resolution when patch_size > 1). Level i has
    widths[i] channels and `num_blocks` residual blocks; every level but the last halves H and W,
    and the last log2(s_t) of those also halve T.
    """

    widths: Sequence[int]
    num_blocks: int
    latent_channels: int
    spatial_downsamples: int
    temporal_downsamples: int
    patch_size: int = 1
    mid_attention: bool = True
    num_groups: int = 32
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        levels = len(self.widths)
        x = space_to_depth(x, self.patch_size)
        x = CausalConv3d(self.widths[0], dtype=self.dtype, name="conv_in")(x.astype(self.dtype))
        for i, width in enumerate(self.widths):
            for j in range(self.num_blocks):
                x = ResBlock(width, self.num_groups, self.dtype, name=f"down{i}_block{j}")(x)
            if i < levels - 1:
                spatial, temporal = _resamples(i, levels, self.spatial_downsamples,
                                               self.temporal_downsamples)
                x = Downsample(width, spatial, temporal, self.dtype, name=f"down{i}_sample")(x)
        x = ResBlock(self.widths[-1], self.num_groups, self.dtype, name="mid_block1")(x)
        if self.mid_attention:
            x = FrameAttention(self.num_groups, self.dtype, name="mid_attention")(x)
        x = ResBlock(self.widths[-1], self.num_groups, self.dtype, name="mid_block2")(x)
        x = nn.silu(FrameGroupNorm(self.num_groups, name="norm_out")(x))
        return CausalConv3d(2 * self.latent_channels, dtype=self.dtype, name="conv_out")(x)


class Decoder(nn.Module):
    """[B, t, h, w, latent_channels] -> [B, 1 + (t-1) * s_t, h * s_s, w * s_s, 3]: the encoder mirrored,
    with num_blocks + 1 residual blocks per level."""

    widths: Sequence[int]
    num_blocks: int
    spatial_downsamples: int
    temporal_downsamples: int
    out_channels: int = 3
    patch_size: int = 1
    mid_attention: bool = True
    num_groups: int = 32
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z):
        levels = len(self.widths)
        x = CausalConv3d(self.widths[-1], dtype=self.dtype, name="conv_in")(z.astype(self.dtype))
        x = ResBlock(self.widths[-1], self.num_groups, self.dtype, name="mid_block1")(x)
        if self.mid_attention:
            x = FrameAttention(self.num_groups, self.dtype, name="mid_attention")(x)
        x = ResBlock(self.widths[-1], self.num_groups, self.dtype, name="mid_block2")(x)
        for i in reversed(range(levels)):
            for j in range(self.num_blocks + 1):
                x = ResBlock(self.widths[i], self.num_groups, self.dtype, name=f"up{i}_block{j}")(x)
            if i > 0:
                spatial, temporal = _resamples(i - 1, levels, self.spatial_downsamples,
                                               self.temporal_downsamples)
                x = Upsample(self.widths[i - 1], spatial, temporal, self.dtype,
                             name=f"up{i}_sample")(x)
        x = nn.silu(FrameGroupNorm(self.num_groups, name="norm_out")(x))
        x = CausalConv3d(self.out_channels * self.patch_size ** 2, dtype=self.dtype,
                         name="conv_out")(x)
        return depth_to_space(x.astype(jnp.float32), self.patch_size)


class VAENet(nn.Module):
    """The trainable network: `encode` gives posterior moments, `decode` pixels; `__call__` both."""

    widths: Sequence[int] = (64, 128, 128)
    num_blocks: int = 1
    latent_channels: int = 4
    spatial_downsamples: int = 2
    temporal_downsamples: int = 2
    patch_size: int = 1
    mid_attention: bool = True
    num_groups: int = 32
    # Added to the predicted log-variance: at initialisation the posterior's std is
    # exp(offset / 2) (0.05 for -6) rather than 1, so early training is not drowned in sampling
    # noise; the KL term still pulls it wherever the data wants.
    logvar_offset: float = -6.0
    dtype: Any = jnp.float32

    def setup(self):
        kw = dict(widths=tuple(self.widths), num_blocks=self.num_blocks,
                  spatial_downsamples=self.spatial_downsamples,
                  temporal_downsamples=self.temporal_downsamples, patch_size=self.patch_size,
                  mid_attention=self.mid_attention,
                  num_groups=self.num_groups, dtype=self.dtype)
        self.encoder = Encoder(latent_channels=self.latent_channels, **kw)
        self.decoder = Decoder(**kw)

    def encode(self, video):
        """Posterior (mean, logvar), each [B, t, h, w, latent_channels] in float32."""
        moments = self.encoder(video).astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar + self.logvar_offset, -30.0, 20.0)

    def decode(self, z):
        return self.decoder(z)

    def __call__(self, video, rng=None):
        """Reconstruction of `video` from a posterior sample (the mean where rng is None)."""
        mean, logvar = self.encode(video)
        z = mean if rng is None else sample_posterior(mean, logvar, rng)
        return self.decode(z), mean, logvar


def sample_posterior(mean: jax.Array, logvar: jax.Array, rng: jax.Array) -> jax.Array:
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mean, exp(logvar)) || N(0, 1)) per example, summed over latent elements: [B]."""
    kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return jnp.sum(kl, axis=tuple(range(1, kl.ndim)))


# The autoencoder interface ------------------------------------------------------------------------


def check_frames(frames: int, temporal_compression: int) -> None:
    """Causal video autoencoders take 1 + k * s_t frames."""
    if frames < 1 or (frames - 1) % temporal_compression:
        valid = ", ".join(str(1 + k * temporal_compression) for k in range(5))
        raise ValueError(
            f"{frames} frames cannot be encoded with temporal compression {temporal_compression}: "
            f"clips need 1 + k * {temporal_compression} frames ({valid}, ...). Trim or pad the clip.")


def check_video(video_shape: Sequence[int], temporal_compression: int,
                spatial_compression: int, channels: int = 3) -> None:
    """Names the problem when a video does not fit a causal autoencoder."""
    if len(video_shape) != 5:
        raise ValueError(f"Expected a video batch [B, T, H, W, C], got shape {tuple(video_shape)}.")
    _, t, h, w, c = video_shape
    if c != channels:
        raise ValueError(f"Videos must have {channels} channels (RGB, last axis), got {c} "
                         f"in shape {tuple(video_shape)}.")
    check_frames(t, temporal_compression)
    if h % spatial_compression or w % spatial_compression:
        raise ValueError(f"Frame size {h}x{w} is not a multiple of the spatial compression "
                         f"{spatial_compression}; crop or resize the video.")


@dataclasses.dataclass(frozen=True)
class IdentityAutoencoder:
    """Pixel space: latents are the video itself."""

    channels: int = 3
    temporal_compression: int = 1
    spatial_compression: int = 1

    @property
    def latent_channels(self) -> int:
        return self.channels

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        return (frames, height, width, self.channels)

    def encode(self, params, video: jax.Array) -> jax.Array:
        del params
        return video

    def decode(self, params, latent: jax.Array) -> jax.Array:
        del params
        return latent


@dataclasses.dataclass(frozen=True)
class CausalVAE:
    """The causal video VAE of this codebase behind the autoencoder interface.

    params = {'net': VAENet parameters, 'shift': [C], 'scale': [C]}; the latent statistics come
    from `latent_statistics` and are stored with the VAE's checkpoints.
    """

    latent_channels: int = 4
    temporal_compression: int = 4
    spatial_compression: int = 4
    widths: tuple[int, ...] = (64, 128, 128)
    patch_size: int = 1
    num_blocks: int = 1
    mid_attention: bool = True
    num_groups: int = 32
    dtype: str = "float32"

    def __post_init__(self):
        if self.temporal_compression not in (1, 2, 4):
            raise ValueError(f"temporal_compression={self.temporal_compression}; valid: 1, 2, 4.")
        if self.spatial_compression not in (4, 8, 16):
            raise ValueError(f"spatial_compression={self.spatial_compression}; valid: 4, 8, 16.")
        if self.patch_size not in (1, 2, 4) or self.patch_size > self.spatial_compression:
            raise ValueError(f"patch_size={self.patch_size}; valid: 1, 2 or 4, at most "
                             f"spatial_compression={self.spatial_compression}.")
        levels = 1 + max(self._downsamples)
        if len(self.widths) != levels:
            raise ValueError(
                f"spatial_compression={self.spatial_compression} with patch_size={self.patch_size} "
                f"and temporal_compression={self.temporal_compression} need {levels} widths (one "
                f"per level; each level but the last downsamples), got widths={tuple(self.widths)}.")
        if not 1 <= self.latent_channels <= 64:
            raise ValueError(f"latent_channels={self.latent_channels} must be in [1, 64].")

    @property
    def _downsamples(self) -> tuple[int, int]:
        """(spatial, temporal) halvings after the patch stem."""
        return (int(math.log2(self.spatial_compression // self.patch_size)),
                int(math.log2(self.temporal_compression)))

    @property
    def net(self) -> VAENet:
        return VAENet(widths=tuple(self.widths), num_blocks=self.num_blocks,
                      latent_channels=self.latent_channels,
                      spatial_downsamples=self._downsamples[0],
                      temporal_downsamples=self._downsamples[1], patch_size=self.patch_size, mid_attention=self.mid_attention, num_groups=self.num_groups,
                      dtype=jnp.dtype(self.dtype))

    def init_net(self, rng: jax.Array, frames: int = 1, size: int | None = None) -> Any:
        size = size or self.spatial_compression
        video = jnp.zeros((1, frames, size, size, 3), jnp.float32)
        return self.net.init(rng, video)["params"]

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        check_video((1, frames, height, width, 3), self.temporal_compression, self.spatial_compression)
        s = self.spatial_compression
        return (1 + (frames - 1) // self.temporal_compression, height // s, width // s,
                self.latent_channels)

    def moments(self, net_params, video: jax.Array) -> tuple[jax.Array, jax.Array]:
        check_video(video.shape, self.temporal_compression, self.spatial_compression)
        return self.net.apply({"params": net_params}, video, method=VAENet.encode)

    def encode(self, params, video: jax.Array) -> jax.Array:
        """Normalised posterior mean: what the DiT generates."""
        mean, _ = self.moments(params["net"], video)
        return (mean - params["shift"]) / params["scale"]

    def decode(self, params, latent: jax.Array) -> jax.Array:
        z = latent * params["scale"] + params["shift"]
        return self.net.apply({"params": params["net"]}, z, method=VAENet.decode)

    # Long videos ----------------------------------------------------------------------------------

    def encode_chunked(self, params, video, *, chunk_latent_frames: int = 2) -> jax.Array:
        """`encode` a few latent frames at a time, carrying the causal cache: equal to `encode`,
        with activation memory bounded by the chunk. The first chunk is 1 + n * s_t frames (the
        lone first frame and n groups), later ones n * s_t (n = chunk_latent_frames)."""
        check_video(video.shape, self.temporal_compression, self.spatial_compression)
        s, n = self.temporal_compression, chunk_latent_frames
        bounds = chunk_bounds(video.shape[1], first=1 + n * s, rest=n * s)
        moments = run_chunked(self.net, params["net"], VAENet.encode, video, bounds)
        mean = jnp.concatenate([m for m, _ in moments], axis=1)
        return (mean - params["shift"]) / params["scale"]

    def decode_chunked(self, params, latent, *, chunk_latent_frames: int = 2,
                       to_host: bool = False) -> jax.Array | np.ndarray:
        """`decode` chunk_latent_frames latent frames at a time, carrying the causal cache.

        Equal to `decode`; with to_host=True each decoded chunk is moved to host memory as it is
        produced, so device memory stays flat however long the video.
        """
        z = latent * params["scale"] + params["shift"]
        bounds = self.decode_chunk_bounds(latent.shape[1], chunk_latent_frames)
        chunks = run_chunked(self.net, params["net"], VAENet.decode, z, bounds,
                          to_host=to_host)
        return (np.concatenate if to_host else jnp.concatenate)(chunks, axis=1)

    def decode_chunk_bounds(self, latent_frames: int, chunk_latent_frames: int) -> list[tuple[int, int]]:
        """Latent-frame ranges of `decode_chunked`: the first chunk has one extra latent frame (the
        lone first frame), so every chunk decodes about as many pixel frames as the next."""
        n = chunk_latent_frames
        return chunk_bounds(latent_frames, first=n + 1, rest=n)

    def decode_tiled(self, params, latent, *, tile: int = 8, overlap: int = 2) -> jax.Array:
        """`decode` in overlapping spatial tiles of tile x tile latent pixels, blended linearly in the
        overlaps: bounded memory for large frames, close to (not equal to) whole-frame decoding,
        since group norms see one tile."""
        z = latent * params["scale"] + params["shift"]
        decode = jax.jit(lambda p, x: self.net.apply({"params": p}, x, method=VAENet.decode))
        return blend_tiles(lambda x: decode(params["net"], x), z, tile=tile, overlap=overlap,
                           scale=self.spatial_compression)


def chunk_bounds(length: int, *, first: int, rest: int) -> list[tuple[int, int]]:
    """[start, stop) ranges over `length` frames: `first` frames, then `rest` at a time."""
    bounds, start = [(0, min(first, length))], min(first, length)
    while start < length:
        bounds.append((start, min(start + rest, length)))
        start += rest
    return bounds


_CHUNK_FNS: dict[Any, Any] = {}


def chunk_fn(net: nn.Module, method):
    """One jitted (params, cache, x) -> (out, cache) per (net, method); compiled once per shape."""
    key = (net, method.__name__)
    if key not in _CHUNK_FNS:
        def run(params, cache, x):
            out, variables = net.apply({"params": params, **cache}, x, method=method,
                                       mutable=["cache"])
            return out, variables
        _CHUNK_FNS[key] = jax.jit(run)
    return _CHUNK_FNS[key]


def run_chunked(net, params, method, x, bounds, *, to_host=False) -> list:
    """`method` of `net` on x[:, start:stop] for each bound in order, the causal cache carried from
    chunk to chunk; returns the outputs (moved to host memory one by one where to_host)."""
    run, cache, outputs = chunk_fn(net, method), {}, []
    for start, stop in bounds:
        out, cache = run(params, cache, x[:, start:stop])
        outputs.append(jax.device_get(out) if to_host else out)
    return outputs


def blend_tiles(decode, z: jax.Array, *, tile: int, overlap: int, scale: int) -> jax.Array:
    """Applies `decode` ([B, t, h, w, C] -> [B, T, h*scale, w*scale, 3]) to overlapping spatial tiles
    of z and blends the results with linear ramps over the overlaps."""
    if not 0 <= overlap < tile:
        raise ValueError(f"Tile overlap {overlap} must be in [0, tile={tile}).")
    _, _, h, w, _ = z.shape
    out = weight = None
    for y0 in _tile_starts(h, tile, overlap):
        for x0 in _tile_starts(w, tile, overlap):
            piece = decode(z[:, :, y0:y0 + tile, x0:x0 + tile])
            ramp_y = _ramp(piece.shape[2], overlap * scale, y0 > 0, y0 + tile < h)
            ramp_x = _ramp(piece.shape[3], overlap * scale, x0 > 0, x0 + tile < w)
            mask = ramp_y[:, None] * ramp_x[None, :]
            if out is None:
                out = jnp.zeros(piece.shape[:2] + (h * scale, w * scale) + piece.shape[4:])
                weight = jnp.zeros((h * scale, w * scale))
            sl = (slice(y0 * scale, y0 * scale + piece.shape[2]),
                  slice(x0 * scale, x0 * scale + piece.shape[3]))
            out = out.at[:, :, sl[0], sl[1]].add(piece * mask[None, None, :, :, None])
            weight = weight.at[sl].add(mask)
    return out / weight[None, None, :, :, None]


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    step = tile - overlap
    starts = list(range(0, size - tile, step))
    return starts + [size - tile]


def _ramp(length: int, overlap: int, fade_in: bool, fade_out: bool) -> jax.Array:
    """Per-pixel blend weights along one axis of a tile: linear ramps across the overlaps."""
    r = jnp.ones((length,))
    if overlap > 0:
        up = (jnp.arange(overlap) + 0.5) / overlap
        if fade_in:
            r = r.at[:overlap].set(up)
        if fade_out:
            r = r.at[length - overlap:].set(up[::-1])
    return r


def latent_statistics(means: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Per-channel shift and scale from posterior means of training clips (list of [B, t, h, w, C])."""
    flat = np.concatenate([np.asarray(m, np.float64).reshape(-1, m.shape[-1]) for m in means])
    return {"shift": flat.mean(0).astype(np.float32),
            "scale": np.maximum(flat.std(0), 1e-6).astype(np.float32)}


AUTOENCODERS = {"identity": IdentityAutoencoder, "causal_vae": CausalVAE}


def get_autoencoder(kind: str, **kwargs):
    """Builds the autoencoder named by `config.autoencoder.kind` from the rest of that config."""
    if kind not in AUTOENCODERS:
        raise ValueError(f"Unknown autoencoder kind {kind!r}; valid kinds: {sorted(AUTOENCODERS)}.")
    fields = {f.name for f in dataclasses.fields(AUTOENCODERS[kind])}
    unknown = set(kwargs) - fields
    if unknown:
        raise ValueError(f"Unknown options {sorted(unknown)} for autoencoder {kind!r}; "
                         f"valid: {sorted(fields)}.")
    return AUTOENCODERS[kind](**{k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()})
