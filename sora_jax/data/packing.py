"""NaViT-style packing: clips of different (frames, height, width) share fixed-length token rows.

Host-side and numpy only. Each clip is a mapping with
    latent     float [t, h, w, c]   t, h, w multiples of the patch size (pt, ph, pw)
    text       float [Lc_i, D]      caption tokens; text_mask bool [Lc_i], True for real tokens
    frames, fps, height, width      the clip's size in pixels and frames per second (numbers)
(the latent cache's record layout plus the sizes). `pack` places them, first-fit decreasing, into R
rows of at most seq_len tokens, max_clips clips and max_slots slots each, and returns static shapes:

    tokens        float32 [R, L, P]         patch values, P = pt*ph*pw*c, each clip laid out exactly as
                                            `patch.patchify` orders it; zeros in padding
    segment_ids   int32   [R, L]            m + 1 for the clip in clip slot m of the row, 0 = padding
    positions     int32   [R, L, 3]         (t, h, w) patch-grid coordinates of the token within its clip
    slot          int32   [R, L]            the conditioning slot of the token (0 for padding)
    slot_clip     int32   [R, K]            m + 1 for the clip each conditioning slot belongs to, 0 unused
    text          float32 [R, M, Lt, D]     clip slot m's caption, zero-padded to Lt tokens
    text_mask     bool    [R, M, Lt]        True for real caption tokens (all False for unused slots)
    sizes         float32 [R, M, 5]         `size_features`: (frames, fps, height, width, height / width)
    clip_id       int32   [R, M]            the index into `clips` of the clip in each slot, -1 unused
    latent_shape  int32   [R, M, 4]         (t, h, w, c) of that clip's latent, for `unpack`

with L = seq_len, M = max_clips, K = max_slots and Lt = text_len. A conditioning slot is one temporal
position (pt latent frames) of one clip: the DiT takes one timestep per slot, and computes its adaLN
modulation once per slot rather than per token. The slots of a row are numbered in token order, so
slot, like segment_ids, is non-decreasing along a row. K bounds the temporal positions per row; a
natural choice is seq_len // (the fewest tokens per temporal position among the sizes trained on).

`unpack` takes a clip back out of an array in this layout (e.g. the DiT's output), `slot_values` lays
out per-clip values of each temporal position (e.g. flow times) as [R, K], and `packing_efficiency`
is the fraction of token positions that hold clips rather than padding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import einops
import numpy as np

SIZE_FIELDS = ("frames", "fps", "height", "width", "aspect")


def size_features(frames: float, fps: float, height: float, width: float) -> np.ndarray:
    """float32 [5]: (frames, fps, height, width, aspect = height / width), the DiT's size conditioning."""
    return np.array([frames, fps, height, width, height / width], np.float32)


def _grid(clip: Mapping[str, Any], index: int, patch_size: Sequence[int]) -> tuple[int, int, int]:
    shape = np.shape(clip["latent"])
    if len(shape) != 4 or any(s % p for s, p in zip(shape, patch_size)):
        raise ValueError(f"clip {index}: latent of shape {shape} is not [t, h, w, c] with (t, h, w) "
                         f"multiples of the patch size {tuple(patch_size)}")
    return tuple(s // p for s, p in zip(shape, patch_size))


def assign_rows(grids: Sequence[Sequence[int]], *, seq_len: int, max_clips: int,
                max_slots: int) -> list[list[int]]:
    """First-fit decreasing: the clip indices of each row, for clips of these (t, h, w) patch grids.

    Clips go in decreasing token count, each into the first row with room for its tokens, its clip
    slot and its temporal positions (every clip is assumed to fit an empty row).
    """
    lengths = [int(np.prod(g)) for g in grids]
    rows: list[list[int]] = []
    used: list[tuple[int, int]] = []  # (tokens, slots) per row
    for i in sorted(range(len(grids)), key=lambda i: -lengths[i]):
        for r, row in enumerate(rows):
            if (len(row) < max_clips and used[r][0] + lengths[i] <= seq_len
                    and used[r][1] + grids[i][0] <= max_slots):
                break
        else:
            r = len(rows)
            rows.append([])
            used.append((0, 0))
        rows[r].append(i)
        used[r] = (used[r][0] + lengths[i], used[r][1] + grids[i][0])
    return rows


def pack(clips: Sequence[Mapping[str, Any]], *, seq_len: int, max_clips: int, max_slots: int,
         patch_size: Sequence[int], text_len: int | None = None,
         num_rows: int | None = None) -> dict[str, np.ndarray]:
    """Packs clips into rows of seq_len tokens; see the module docstring for the clips and the result.

    Clips go in decreasing token count, each into the first row with room for its tokens, its clip
    slot and its temporal positions. text_len: caption length after padding (default: the longest
    caption given; fix it for static shapes across batches). num_rows: pad the result to exactly this
    many rows (default: as many as the clips need).
    Raises ValueError for a clip that cannot fit in an empty row, or clips that need more than
    num_rows rows.
    """
    if not clips:
        raise ValueError("pack needs at least one clip")
    grids = [_grid(clip, i, patch_size) for i, clip in enumerate(clips)]
    lengths = [int(np.prod(g)) for g in grids]
    for i, (grid, length) in enumerate(zip(grids, lengths)):
        if length > seq_len or grid[0] > max_slots:
            raise ValueError(
                f"clip {i} of latent shape {np.shape(clips[i]['latent'])} makes {length} tokens on a "
                f"{grid} patch grid (patch size {tuple(patch_size)}), which cannot fit one packed row "
                f"of seq_len={seq_len} tokens and max_slots={max_slots} temporal positions")
    text_len = max(len(clip["text_mask"]) for clip in clips) if text_len is None else text_len
    if any(len(clip["text_mask"]) > text_len for clip in clips):
        raise ValueError(f"a caption has more than text_len={text_len} tokens")

    rows = assign_rows(grids, seq_len=seq_len, max_clips=max_clips, max_slots=max_slots)
    if num_rows is not None and len(rows) > num_rows:
        raise ValueError(f"{len(clips)} clips need {len(rows)} packed rows of seq_len={seq_len}, "
                         f"more than num_rows={num_rows}")

    n_rows = len(rows) if num_rows is None else num_rows
    patch_dim = int(np.prod(patch_size)) * np.shape(clips[0]["latent"])[-1]
    text_dim = np.shape(clips[0]["text"])[-1]
    out = {
        "tokens": np.zeros((n_rows, seq_len, patch_dim), np.float32),
        "segment_ids": np.zeros((n_rows, seq_len), np.int32),
        "positions": np.zeros((n_rows, seq_len, 3), np.int32),
        "slot": np.zeros((n_rows, seq_len), np.int32),
        "slot_clip": np.zeros((n_rows, max_slots), np.int32),
        "text": np.zeros((n_rows, max_clips, text_len, text_dim), np.float32),
        "text_mask": np.zeros((n_rows, max_clips, text_len), bool),
        "sizes": np.zeros((n_rows, max_clips, len(SIZE_FIELDS)), np.float32),
        "clip_id": np.full((n_rows, max_clips), -1, np.int32),
        "latent_shape": np.zeros((n_rows, max_clips, 4), np.int32),
    }
    pt, ph, pw = patch_size
    for r, row in enumerate(rows):
        start = first_slot = 0
        for m, i in enumerate(row):
            clip, grid, end = clips[i], grids[i], start + lengths[i]
            latent = np.asarray(clip["latent"], np.float32)
            out["tokens"][r, start:end] = einops.rearrange(
                latent, "(t pt) (h ph) (w pw) c -> (t h w) (pt ph pw c)", pt=pt, ph=ph, pw=pw)
            out["segment_ids"][r, start:end] = m + 1
            positions = np.stack(np.meshgrid(*map(np.arange, grid), indexing="ij"), -1).reshape(-1, 3)
            out["positions"][r, start:end] = positions
            out["slot"][r, start:end] = first_slot + positions[:, 0]
            out["slot_clip"][r, first_slot:first_slot + grid[0]] = m + 1
            caption = len(clip["text_mask"])
            out["text"][r, m, :caption] = clip["text"]
            out["text_mask"][r, m, :caption] = clip["text_mask"]
            out["sizes"][r, m] = size_features(clip["frames"], clip["fps"], clip["height"], clip["width"])
            out["clip_id"][r, m] = i
            out["latent_shape"][r, m] = latent.shape
            start, first_slot = end, first_slot + grid[0]
    return out


def packing_efficiency(packed: Mapping[str, np.ndarray]) -> float:
    """The fraction of token positions that hold a clip's tokens rather than padding."""
    return float(np.mean(np.asarray(packed["segment_ids"]) > 0))


def slot_values(packed: Mapping[str, np.ndarray], values: Sequence[Any]) -> np.ndarray:
    """Per-clip values of each temporal position (values[i]: [t_i / pt] for clips[i], e.g. flow times
    with given frames at 0) -> float32 [R, K] in the slot layout, 0 in unused slots."""
    slot_clip = np.asarray(packed["slot_clip"])
    out = np.zeros(slot_clip.shape, np.float32)
    for r, m in zip(*np.nonzero(np.asarray(packed["clip_id"]) >= 0)):
        (slots,) = np.nonzero(slot_clip[r] == m + 1)
        value = np.asarray(values[packed["clip_id"][r, m]], np.float32)
        if value.shape != slots.shape:
            raise ValueError(f"clip {packed['clip_id'][r, m]} has {len(slots)} temporal positions, "
                             f"got values of shape {value.shape}")
        out[r, slots] = value
    return out


def unpack(tokens: np.ndarray, packed: Mapping[str, np.ndarray], clip_index: int) -> np.ndarray:
    """tokens: [R, L, P] in the packed layout (e.g. the DiT's output) -> the latent [t, h, w, c] of
    clips[clip_index], the inverse of `pack`'s patchify."""
    rows, slots = np.nonzero(np.asarray(packed["clip_id"]) == clip_index)
    if not len(rows):
        raise ValueError(f"clip {clip_index} is not in this packed batch")
    r, m = rows[0], slots[0]
    (index,) = np.nonzero(np.asarray(packed["segment_ids"])[r] == m + 1)
    t, h, w, c = (int(s) for s in packed["latent_shape"][r, m])
    grid = np.asarray(packed["positions"])[r, index[-1]] + 1  # the last token is at the far corner
    return einops.rearrange(np.asarray(tokens)[r, index], "(t h w) (pt ph pw c) -> (t pt) (h ph) (w pw) c",
                            t=grid[0], h=grid[1], w=grid[2], pt=t // grid[0], ph=h // grid[1],
                            pw=w // grid[2], c=c)
