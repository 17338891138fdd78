"""Writing videos: .mp4 (ffmpeg through imageio), .gif (Pillow), .png (a grid of frames).

Several videos are tiled side by side into one file, so a batch of samples is one artefact.
"""

from __future__ import annotations

import os

import numpy as np

from sora_jax import paths

FORMATS = (".mp4", ".gif", ".png")


def tile(videos: np.ndarray, pad: int = 2) -> np.ndarray:
    """Tiles videos [N, T, H, W, 3] side by side into one video [T, H, N*(W+pad)-pad, 3]."""
    videos = np.asarray(videos)
    n, t, h, w, c = videos.shape
    out = np.full((t, h, n * (w + pad) - pad, c), 255, np.uint8)
    for i, video in enumerate(videos):
        out[:, :, i * (w + pad): i * (w + pad) + w] = video
    return out


def frame_grid(video: np.ndarray, pad: int = 2) -> np.ndarray:
    """Frames [T, H, W, 3] of one (tiled) video as one image, frames stacked top to bottom."""
    t, h, w, c = video.shape
    out = np.full((t * (h + pad) - pad, w, c), 255, np.uint8)
    for i, frame in enumerate(video):
        out[i * (h + pad): i * (h + pad) + h] = frame
    return out


def check_writable(path: str) -> None:
    """Raises a clear error before any work when `path` cannot be written as a video."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise ValueError(f"Cannot write {path!r}: the extension must be one of {FORMATS}.")
    if not paths.is_local(path):  # a bucket: its folders need no creating, access shows on upload
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"Cannot write {path!r}: it is a directory.")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise ValueError(f"Cannot write {path!r}: cannot create folder {folder!r} ({e}).") from e
    if not os.access(folder, os.W_OK):
        raise ValueError(f"Cannot write {path!r}: folder {folder!r} is not writable.")


def write_video(path: str, videos: np.ndarray, fps: int = 8, scale: int = 4) -> str:
    """Writes uint8 videos [N, T, H, W, 3] (or one video [T, H, W, 3]) to `path`.

    Small videos are enlarged `scale` times (nearest neighbour) so they can be seen. Returns path.
    """
    check_writable(path)
    videos = np.asarray(videos, np.uint8)
    if videos.ndim == 4:
        videos = videos[None]
    if videos.ndim != 5 or videos.shape[-1] != 3:
        raise ValueError(f"Expected videos [N, T, H, W, 3], got shape {videos.shape}.")
    video = tile(videos)
    if scale > 1:
        video = video.repeat(scale, axis=1).repeat(scale, axis=2)
    ext = os.path.splitext(path)[1].lower()

    def write(tmp):  # then moved into place whole: an interrupted write never leaves a torn file
        if ext == ".png":
            from PIL import Image
            Image.fromarray(frame_grid(video)).save(tmp)
        elif ext == ".gif":
            from PIL import Image
            frames = [Image.fromarray(f) for f in video]
            frames[0].save(tmp, save_all=True, append_images=frames[1:], duration=int(1000 / fps),
                           loop=0)
        else:
            import imageio.v2 as imageio
            # H.264 wants even sides; macro_block_size=1 keeps the exact size.
            h, w = video.shape[1:3]
            padded = np.pad(video, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
            with imageio.get_writer(tmp, fps=fps, codec="libx264", quality=8,
                                    macro_block_size=1, ffmpeg_log_level="error") as writer:
                for frame in padded:
                    writer.append_data(frame)

    return paths.write_file(path, write, suffix=ext)
