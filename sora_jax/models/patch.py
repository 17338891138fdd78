"""Spacetime patches and 3D rotary position embeddings, for any (frames, height, width).

Tokens are ordered time-major, then rows, then columns, so the tokens of one temporal position (one
group of pt frames) form a contiguous run of grid_h * grid_w tokens.
"""

from collections.abc import Sequence

import einops
import jax
import jax.numpy as jnp
import numpy as np


def grid_size(shape: Sequence[int], patch_size: Sequence[int]) -> tuple[int, int, int]:
    """(T, H, W) -> the patch grid (T/pt, H/ph, W/pw); ValueError if a size is not a multiple."""
    if any(s % p for s, p in zip(shape, patch_size)):
        raise ValueError(f"(frames, height, width) = {tuple(shape)} is not a multiple of the patch size "
                         f"{tuple(patch_size)}")
    return tuple(s // p for s, p in zip(shape, patch_size))


def patchify(x: jax.Array, patch_size: Sequence[int]) -> jax.Array:
    """x: [B, T, H, W, C] -> tokens [B, T/pt * H/ph * W/pw, pt*ph*pw*C]."""
    grid_size(x.shape[1:4], patch_size)
    pt, ph, pw = patch_size
    return einops.rearrange(x, "b (t pt) (h ph) (w pw) c -> b (t h w) (pt ph pw c)", pt=pt, ph=ph, pw=pw)


def unpatchify(tokens: jax.Array, grid: Sequence[int], patch_size: Sequence[int],
               channels: int) -> jax.Array:
    """The inverse of `patchify`: tokens [B, t*h*w, pt*ph*pw*C] on grid (t, h, w) -> [B, T, H, W, C]."""
    (t, h, w), (pt, ph, pw) = grid, patch_size
    return einops.rearrange(tokens, "b (t h w) (pt ph pw c) -> b (t pt) (h ph) (w pw) c",
                            t=t, h=h, w=w, pt=pt, ph=ph, pw=pw, c=channels)


def check_tileable(frames: int, height: int, width: int, patch_size: Sequence[int],
                   temporal_compression: int = 1, spatial_compression: int = 1) -> None:
    """Raises ValueError, naming valid nearby sizes, unless a (frames, height, width) video tiles exactly.

    A causal autoencoder with temporal compression s maps 1 + k*s frames to 1 + k latent frames, which
    must then split into temporal patches of pt; height and width must be multiples of
    spatial_compression * (ph, pw).
    """
    pt, ph, pw = patch_size
    s = temporal_compression
    problems = []
    if frames < 1 or (frames - 1) % s or (1 + (frames - 1) // s) % pt:
        valid = [1 + (j * pt - 1) * s for j in range(1, frames // (pt * s) + 3)]
        rule = f"1 + k*{s}" + (f" with 1 + k a multiple of {pt}" if pt > 1 else "")
        problems.append(f"frames must be {rule}; try {_nearest(frames, valid)}")
    for name, size, p in (("height", height, ph), ("width", width, pw)):
        m = spatial_compression * p
        if size < m or size % m:
            problems.append(f"{name} must be a multiple of {m}; try "
                            f"{_nearest(size, [m * j for j in range(1, size // m + 2)])}")
    if problems:
        raise ValueError(f"cannot tile {frames} x {height} x {width} (frames x height x width) into patches "
                         f"{tuple(patch_size)} after {s}x{spatial_compression}x{spatial_compression} "
                         f"compression: " + "; ".join(problems))


def _nearest(size, valid):
    below = [v for v in valid if v < size]
    above = [v for v in valid if v > size]
    return " or ".join(str(v) for v in sorted(set(below[-1:] + above[:1])))


def grid_positions(grid: Sequence[int]) -> np.ndarray:
    """(t, h, w) -> int32 [t*h*w, 3]: the (t, h, w) index of each token, in patchify's order."""
    axes = np.meshgrid(*[np.arange(n, dtype=np.int32) for n in grid], indexing="ij")
    return np.stack(axes, axis=-1).reshape(-1, 3)


def rope_sections(head_dim: int) -> tuple[int, int, int]:
    """How many of the head_dim / 2 rotation pairs go to (t, h, w).

    Height and width each get a third, rounded down, and time the rest, so time never gets fewer
    frequencies than a spatial axis: 32 pairs (head_dim 64) -> (12, 10, 10).
    """
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"3D RoPE needs an even head_dim of at least 6, got {head_dim}")
    pairs = head_dim // 2
    return pairs - 2 * (pairs // 3), pairs // 3, pairs // 3


def rope(positions: jax.Array, head_dim: int, theta: float = 10000.0) -> tuple[jax.Array, jax.Array]:
    """Rotary angles for 3D positions.

    positions: [..., L, 3] (t, h, w) coordinates, integer or not.
    Returns (cos, sin), each [..., L, head_dim / 2] f32: pair i rotates at theta^(-j/n) times the
    coordinate of its axis, for the j-th of that axis's n pairs (`rope_sections`).
    """
    angles = []
    for axis, n in enumerate(rope_sections(head_dim)):
        freqs = theta ** (-jnp.arange(n, dtype=jnp.float32) / n)
        angles.append(jnp.asarray(positions, jnp.float32)[..., axis, None] * freqs)
    angles = jnp.concatenate(angles, axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def rope_3d(grid: Sequence[int], head_dim: int, theta: float = 10000.0) -> tuple[jax.Array, jax.Array]:
    """(cos, sin), each [t*h*w, head_dim / 2], for the tokens of a (t, h, w) patch grid."""
    return rope(grid_positions(grid), head_dim, theta)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates each pair (x[..., i], x[..., i + D/2]) of x: [B, L, H, D] by its angle.

    cos, sin: [L, D/2], or [B, L, D/2] for positions that differ per example. Returns f32.
    The halves are swapped by reversing an axis of size 2 rather than by splitting and concatenating:
    one elementwise pass each way, where a concatenation and its gradient's slices are separate
    passes over q and k on CPU.
    """
    *lead, d = x.shape
    halves = x.astype(jnp.float32).reshape(*lead, 2, d // 2)  # [..., (x1, x2), D/2]
    cos, sin = cos[..., None, None, :], sin[..., None, None, :]  # Shared by the heads and halves.
    signed_sin = jnp.concatenate([-sin, sin], axis=-2)  # [..., 2, D/2], small: no head axis
    # (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)
    return (halves * cos + jnp.flip(halves, axis=-2) * signed_sin).reshape(x.shape)
