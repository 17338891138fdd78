"""The causal video VAE with a clip split over a mesh axis, so long or large videos fit.

`sharded_encode` and `sharded_decode` equal `CausalVAE.encode` / `decode` while each of the n
devices of mesh axis `axis` (default `sequence`) holds and computes 1/n of every activation:

  over='frames'   the clip's frames, in latent-frame-aligned chunks. The first frame (which a causal
                  VAE encodes on its own) runs whole, filling each causal convolution's cache; the
                  other k latent frames go k/n to each device, and each causal convolution there
                  takes its past frames (1 or 2) from the previous device with one `ppermute` (a
                  halo), device 0 from the first frame's cache. Explicit (`shard_map`): left to the
                  compiler, the uneven frame axis (the lone first frame, each convolution's past)
                  is reshuffled between devices at strided layers, and compiles slowly.
                  Needs k a multiple of n with at least 2 latent frames per device (a convolution's
                  past). The result, whose 1 + k frames do not split evenly, is whole on every
                  device; activations, which dominate memory, stay split.
  over='height'   bands of whole latent rows of every frame. The compiler partitions the 2D
                  convolutions itself (GSPMD): halo exchanges for the convolutions, all-reduces for
                  the per-frame group norms and, with mid_attention, an all-gather of the bottleneck
                  attention's keys and values (a pixel attends to its whole frame). Needs the latent
                  height a multiple of n. The result stays split by rows.

The batch axis is split over `batch_axes` (none by default; the batch must be a multiple of their
product); other mesh axes hold copies.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sora_jax.models import vae as vae_lib

OVER = ("frames", "height")


@functools.partial(jax.jit, static_argnames=("vae", "mesh", "over", "axis", "batch_axes"))
def sharded_encode(vae: vae_lib.CausalVAE, params, video: jax.Array, mesh: Mesh, *,
                   over: str = "frames", axis: str = "sequence",
                   batch_axes: tuple[str, ...] = ()) -> jax.Array:
    """`vae.encode(params, video)` with video [B, T, H, W, 3] split over mesh axis `axis`.

    over='frames' needs (T - 1) / temporal_compression latent frames after the first, a multiple of
    the axis size n with at least 2 per device; 'height' needs H / spatial_compression a multiple
    of n. Returns the normalised latent [B, t, h, w, C]. Jitted: vae, mesh, over, axis and
    batch_axes (a tuple) are static.
    """
    _check_vae(vae)
    vae_lib.check_video(video.shape, vae.temporal_compression, vae.spatial_compression)
    _check(vae, mesh, over, axis, batch_axes,
           latent_shape=(video.shape[0],) + vae.latent_shape(*video.shape[1:4]))
    if over == "height":
        video = lax.with_sharding_constraint(video, _sharding(mesh, over, axis, batch_axes))
        return lax.with_sharding_constraint(vae.encode(params, video),
                                            _sharding(mesh, over, axis, batch_axes))
    first, rest = _split_first_frame(video, mesh, axis, batch_axes)
    (mean_first, _), (mean_rest, _) = _apply_frames(vae, mesh, axis, params["net"], first, rest,
                                                    vae_lib.VAENet.encode)
    mean = jnp.concatenate([mean_first, mean_rest], axis=1)
    return (mean - params["shift"]) / params["scale"]


@functools.partial(jax.jit, static_argnames=("vae", "mesh", "over", "axis", "batch_axes"))
def sharded_decode(vae: vae_lib.CausalVAE, params, latent: jax.Array, mesh: Mesh, *,
                   over: str = "frames", axis: str = "sequence",
                   batch_axes: tuple[str, ...] = ()) -> jax.Array:
    """`vae.decode(params, latent)` with latent [B, t, h, w, C] split over mesh axis `axis`.

    over='frames' needs t - 1 a multiple of the axis size n with at least 2 latent frames per
    device; 'height' needs h a multiple of n. Returns the video [B, T, H, W, 3]. Jitted as
    `sharded_encode`.
    """
    _check_vae(vae)
    if latent.ndim != 5 or latent.shape[-1] != vae.latent_channels:
        raise ValueError(f"Expected a latent [B, t, h, w, {vae.latent_channels}], got shape "
                         f"{tuple(latent.shape)}.")
    _check(vae, mesh, over, axis, batch_axes, latent_shape=latent.shape)
    if over == "height":
        latent = lax.with_sharding_constraint(latent, _sharding(mesh, over, axis, batch_axes))
        return lax.with_sharding_constraint(vae.decode(params, latent),
                                            _sharding(mesh, over, axis, batch_axes))
    z = latent * params["scale"] + params["shift"]
    first, rest = _split_first_frame(z, mesh, axis, batch_axes)
    out_first, out_rest = _apply_frames(vae, mesh, axis, params["net"], first, rest,
                                        vae_lib.VAENet.decode)
    return jnp.concatenate([out_first, out_rest], axis=1)


# Frames: explicit halo exchange ------------------------------------------------------------------


def _split_first_frame(x, mesh, axis, batch_axes):
    """(x[:, :1], x[:, 1:] with its frames split over `axis`)."""
    return (lax.with_sharding_constraint(x[:, :1], NamedSharding(mesh, P(batch_axes or None))),
            lax.with_sharding_constraint(x[:, 1:], _sharding(mesh, "frames", axis, batch_axes)))


def _previous_device_past(axis: str, size: int):
    """A method interceptor giving each causal convolution, as its past, the last input frames of
    the previous device's chunk, and on device 0 the past cached by the first frame."""

    def interceptor(next_fun, args, kwargs, context):
        conv = context.module
        if not isinstance(conv, vae_lib.CausalConv3d) or context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        x, = args
        frames = conv.kernel_size[0] - conv.strides[0]
        if frames > 0:
            # The net runs with a mutable cache only so that its past can be replaced here; what
            # it stores for a next chunk is dropped.
            halo = lax.ppermute(x[:, -frames:], axis, [(i, i + 1) for i in range(size - 1)])
            cached = conv.get_variable("cache", "past")
            past = jnp.where(lax.axis_index(axis) == 0, cached, halo.astype(cached.dtype))
            conv.put_variable("cache", "past", past)
        return next_fun(*args, **kwargs)

    return interceptor


def _apply_frames(vae, mesh, axis, net_params, first, rest, method):
    """`method` of the VAE's net on concat(first, rest) along frames, rest split over `axis`.
    Returns (the output of first, the output of rest, split like rest)."""
    out_first, cache = vae.net.apply({"params": net_params}, first, method=method,
                                     mutable=["cache"])

    def local(net_params, cache, chunk):
        with nn.intercept_methods(_previous_device_past(axis, mesh.shape[axis])):
            out, _ = vae.net.apply({"params": net_params, **cache}, chunk, method=method,
                                   mutable=["cache"])
        return out

    # Every device takes the first frame's cache whole, so its gradient is summed over `axis`:
    # in f32, as XLA's CPU compiler fails on a bf16 all-reduce there (the convolutions cast the
    # past back to their own dtype).
    cache = jax.tree.map(lambda c: c.astype(jnp.float32), cache)
    split = P(None, axis)
    out_rest = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), split), out_specs=split,
                             axis_names={axis})(net_params, cache, rest)
    return out_first, out_rest


# Checks -----------------------------------------------------------------------------------------


def _sharding(mesh, over, axis, batch_axes) -> NamedSharding:
    """[B, T, H, W, C] split over batch_axes along B and over `axis` along T or H."""
    spec = [batch_axes or None, None, None, None, None]
    spec[1 if over == "frames" else 2] = axis
    return NamedSharding(mesh, P(*spec))


def _check_vae(vae) -> None:
    if not isinstance(vae, vae_lib.CausalVAE):
        raise ValueError(f"Sharded encoding and decoding take a CausalVAE, got "
                         f"{type(vae).__name__}; use its own encode/decode.")


def _check(vae, mesh, over, axis, batch_axes, latent_shape) -> None:
    """Names the problem when the mesh or the sizes do not allow the split."""
    if over not in OVER:
        raise ValueError(f"over={over!r}; valid: {', '.join(OVER)}.")
    if not isinstance(batch_axes, tuple):
        raise ValueError(f"batch_axes={batch_axes!r} must be a tuple of mesh axis names.")
    unknown = [a for a in (axis, *batch_axes) if a not in mesh.axis_names]
    if unknown:
        raise ValueError(f"Mesh axes {unknown} are not in the mesh, whose axes are "
                         f"{mesh.axis_names}.")
    if axis in batch_axes:
        raise ValueError(f"Mesh axis {axis!r} cannot split both the batch and the {over}.")
    batch, t, h, _, _ = latent_shape
    batch_ways = math.prod(mesh.shape[a] for a in batch_axes)
    if batch % batch_ways:
        raise ValueError(f"A batch of {batch} does not split over mesh axes {tuple(batch_axes)} "
                         f"({batch_ways} ways): use a multiple of {batch_ways} clips, or fewer "
                         "batch_axes.")
    n = mesh.shape[axis]
    if over == "frames":
        per_device, left = divmod(t - 1, n)
        if left or per_device < 2:
            latent = [1 + j * n for j in range(2, 5)]
            pixels = [1 + (f - 1) * vae.temporal_compression for f in latent]
            raise ValueError(
                f"{t} latent frames do not split over the {n} devices of mesh axis {axis!r}: "
                f"after the first latent frame each device takes an equal chunk of at least 2. "
                f"Use 1 + {n} * j latent frames with j >= 2 ({', '.join(map(str, latent))}, ...; "
                f"videos of {', '.join(map(str, pixels))}, ... frames): trim or pad the clip, or "
                "split over 'height'.")
    elif h % n:
        raise ValueError(
            f"A latent height of {h} rows does not split over the {n} devices of mesh axis "
            f"{axis!r}: it must be a multiple of {n} (frames a multiple of "
            f"{n * vae.spatial_compression} pixels high). Crop or pad the frames, or split over "
            "'frames'.")
