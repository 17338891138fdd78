"""Reconstruction quality: PSNR and SSIM of videos in [-1, 1], per clip, and how reconstructions
move from frame to frame against the clips themselves (`temporal_consistency`).

SSIM follows Wang et al. (2004): an 11x11 Gaussian window (sigma 1.5) over each frame and channel
of [0, 1] images, constants (0.01, 0.03), the mean over valid window positions, frames and
channels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def psnr(reconstruction, video) -> np.ndarray:
    """Peak signal-to-noise ratio in dB per clip ([B, ...] in [-1, 1]): [B]."""
    a = np.clip(np.asarray(reconstruction, np.float64), -1, 1) / 2
    b = np.asarray(video, np.float64) / 2
    mse = np.mean(np.square(a - b), axis=tuple(range(1, a.ndim)))
    return -10.0 * np.log10(np.maximum(mse, 1e-10))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size) - (size - 1) / 2
    g = np.exp(-x ** 2 / (2 * sigma ** 2))
    return (g / g.sum()).astype(np.float32)


@jax.jit
def _ssim_frames(a, b):
    """a, b: [N, H, W] in [0, 1] -> SSIM per image [N]."""
    g = jnp.asarray(_gaussian_window(min(11, a.shape[1], a.shape[2]) | 1))
    def blur(x):
        x = jax.vmap(lambda img: jax.vmap(lambda r: jnp.convolve(r, g, mode="valid"))(img))(x)
        x = jnp.swapaxes(x, 1, 2)
        x = jax.vmap(lambda img: jax.vmap(lambda r: jnp.convolve(r, g, mode="valid"))(img))(x)
        return jnp.swapaxes(x, 1, 2)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return jnp.mean(s, axis=(1, 2))


def ssim(reconstruction, video) -> np.ndarray:
    """Structural similarity per clip ([B, T, H, W, C] in [-1, 1]): [B]."""
    a = (np.clip(np.asarray(reconstruction, np.float32), -1, 1) + 1) / 2
    b = (np.asarray(video, np.float32) + 1) / 2
    batch = a.shape[0]
    frames = lambda x: np.moveaxis(x, -1, 2).reshape((-1,) + x.shape[2:4])  # [B*T*C, H, W]
    per_image = np.asarray(_ssim_frames(frames(a), frames(b)))
    return per_image.reshape(batch, -1).mean(axis=1)


def temporal_consistency(reconstruction, video) -> dict[str, float]:
    """Frame-to-frame differences of reconstructions [B, T, H, W, C] against their clips (in [-1, 1],
    measured in grey levels like eval/prompting_eval.py; T >= 2):

      step_ratio    the mean difference between consecutive reconstructed frames over that between
                    the clips' consecutive frames: above 1, reconstructions flicker.
      splice_ratio  the mean difference between a clip's frame and the reconstruction of its
                    neighbour (either side) over the clips' consecutive-frame difference: the seam
                    ratio of prompting's evaluation where a given frame meets a generated one, for
                    a generator that produced the true latents. Seams of latent prompting rarely
                    score lower.
    """
    grey = lambda x: np.round((np.clip(np.asarray(x, np.float32), -1, 1) + 1) * 127.5)
    a, b = grey(reconstruction), grey(video)
    if a.shape != b.shape or a.ndim != 5 or a.shape[1] < 2:
        raise ValueError(f"Need reconstructions and clips of one shape [B, T >= 2, H, W, C], got "
                         f"{list(a.shape)} and {list(b.shape)}.")
    step = lambda x, y: float(np.abs(x[:, 1:] - y[:, :-1]).mean())
    motion = max(step(b, b), 1e-6)
    return {"step_ratio": step(a, a) / motion,
            "splice_ratio": (step(a, b) + step(b, a)) / 2 / motion}
