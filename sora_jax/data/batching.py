"""Batches of clips of many sizes under a token budget: padding, buckets, or packing.

Every batcher turns a stream of clips (the mappings of `packing.pack`: latent [t, h, w, c], caption
tokens and mask, frames/fps/height/width) into packed batches (`packing.pack`'s arrays), so that one
DiT train step serves all three ways:

    pad      one clip per row, every row `seq_len` tokens long (the longest clip allowed): the
             simple way, wasting whatever a clip leaves empty
    bucket   one clip per row, every clip of a batch the same (t, h, w), rows per batch from the
             token budget: no padding, one compiled step per size
    pack     several clips per row, rows `seq_len` tokens long, filled first-fit decreasing
             (NaViT); a batch closes after `lookahead` clips failed to fit, which wait for the
             next one in their order

`tokens_per_batch` fixes the work of a step: pad and pack use tokens_per_batch // seq_len rows, a
bucket tokens_per_batch // (its tokens per clip) rows, each rounded down to a multiple of
`row_multiple` (the ways the mesh splits the batch). A batcher keeps the clips it has read but not
yet placed; a resumed run starts without them. When the clips run out (a finite split), the last
batches go out partly filled, their empty rows all padding.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from sora_jax.data import packing

BATCHINGS = ("pad", "bucket", "pack")
Clip = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Batcher:
    """Packed batches from clips; see the module docstring.

    Attributes:
      batching: 'pad', 'bucket' or 'pack'.
      tokens_per_batch: latent tokens a batch holds, padding included.
      seq_len: tokens per row for 'pad' and 'pack' (at least the longest clip's).
      max_clips: clips per row for 'pack' (1 otherwise).
      max_slots: temporal positions per row for 'pack' (a clip's t / pt otherwise).
      patch_size: (pt, ph, pw) of the DiT.
      text_len: caption tokens per clip.
      row_multiple: rows per batch are a multiple of this.
    """

    batching: str
    tokens_per_batch: int
    seq_len: int
    max_clips: int
    max_slots: int
    patch_size: tuple[int, int, int]
    text_len: int
    row_multiple: int = 1
    lookahead: int = 8  # 'pack': clips that fail to fit before a batch is closed

    def __post_init__(self):
        if self.batching not in BATCHINGS:
            raise ValueError(f"Unknown batching {self.batching!r}; valid: {list(BATCHINGS)}.")
        if self.rows(self.seq_len) < 1:
            raise ValueError(f"tokens_per_batch={self.tokens_per_batch} holds no row of "
                             f"seq_len={self.seq_len} tokens (x{self.row_multiple} rows); raise it.")

    def rows(self, row_tokens: int) -> int:
        """Rows per batch for rows of `row_tokens` tokens: the budget, in multiples of row_multiple."""
        return self.tokens_per_batch // row_tokens // self.row_multiple * self.row_multiple

    def tokens(self, clip: Clip) -> int:
        return int(np.prod([s // p for s, p in zip(np.shape(clip["latent"])[:3], self.patch_size)]))

    def _pack(self, clips: Sequence[Clip], **kw) -> dict[str, np.ndarray]:
        return packing.pack(clips, patch_size=self.patch_size, text_len=self.text_len, **kw)

    def __call__(self, clips: Iterable[Clip]) -> Iterator[dict[str, np.ndarray]]:
        clips = iter(clips)
        if self.batching == "pad":
            yield from self._padded(clips)
        elif self.batching == "bucket":
            yield from self._bucketed(clips)
        else:
            yield from self._packed(clips)

    def _check(self, clip: Clip) -> Clip:
        if self.tokens(clip) > self.seq_len:
            raise ValueError(f"A clip of latent shape {np.shape(clip['latent'])} makes "
                             f"{self.tokens(clip)} tokens, more than seq_len={self.seq_len}; raise "
                             "config.data.seq_len or lower the dataset's max_frames / max_area.")
        return clip

    def _padded(self, clips: Iterator[Clip]) -> Iterator[dict[str, np.ndarray]]:
        rows = self.rows(self.seq_len)
        while batch := [self._check(c) for _, c in zip(range(rows), clips)]:
            yield self._pack(batch, seq_len=self.seq_len, max_clips=1,
                             max_slots=self.max_slots, num_rows=rows)

    def _bucketed(self, clips: Iterator[Clip]) -> Iterator[dict[str, np.ndarray]]:
        buckets: dict[tuple[int, ...], list[Clip]] = collections.defaultdict(list)

        def batch(shape):
            tokens = self.tokens(buckets[shape][0])
            return self._pack(buckets.pop(shape), seq_len=tokens, max_clips=1,
                              max_slots=shape[0] // self.patch_size[0],
                              num_rows=max(self.rows(tokens), self.row_multiple))

        for clip in clips:
            shape = tuple(np.shape(self._check(clip)["latent"]))
            buckets[shape].append(clip)
            if len(buckets[shape]) == max(self.rows(self.tokens(clip)), self.row_multiple):
                yield batch(shape)
        for shape in list(buckets):
            yield batch(shape)

    def _packed(self, clips: Iterator[Clip]) -> Iterator[dict[str, np.ndarray]]:
        rows = self.rows(self.seq_len)
        pending: collections.deque[Clip] = collections.deque()
        while True:
            batch: list[Clip] = []
            held: list[Clip] = []  # clips that did not fit this batch: they open the next one
            while len(held) < self.lookahead:
                clip = pending.popleft() if pending else next(clips, None)
                if clip is None:
                    break
                batch.append(self._check(clip))
                if len(self._assign(batch)) > rows:
                    held.append(batch.pop())
            pending.extendleft(reversed(held))
            if not batch:
                return
            yield self._pack(batch, seq_len=self.seq_len, max_clips=self.max_clips,
                             max_slots=self.max_slots, num_rows=rows)

    def _assign(self, clips: Sequence[Clip]) -> list[list[int]]:
        grids = [tuple(s // p for s, p in zip(np.shape(c["latent"])[:3], self.patch_size))
                 for c in clips]
        return packing.assign_rows(grids, seq_len=self.seq_len, max_clips=self.max_clips,
                                   max_slots=self.max_slots)
