"""Memoised text encoding for the host side of training and sampling.

Captions repeat across a dataset and the encoder is frozen, so each distinct caption is encoded
once. Misses are encoded in power-of-two batches, which bounds how many shapes the encoder's jit
compiles.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sora_jax.models.text import TextEncoder


class CachedTextEncoder:
    """`encode(captions) -> (tokens float32 [B, L, D], mask bool [B, L])` as numpy, memoised."""

    def __init__(self, encoder: TextEncoder, max_entries: int = 200_000):
        self.encoder = encoder
        self.max_entries = max_entries
        self._cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def __call__(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        captions = [c.decode() if isinstance(c, bytes) else str(c) for c in captions]
        missing = list(dict.fromkeys(c for c in captions if c not in self._cache))
        if len(self._cache) + len(missing) > self.max_entries:
            self._cache.clear()
            missing = list(dict.fromkeys(captions))
        while missing:
            chunk, missing = missing[:64], missing[64:]
            size = 1 << (len(chunk) - 1).bit_length()
            tokens, mask = self.encoder.encode(chunk + [chunk[-1]] * (size - len(chunk)))
            tokens, mask = np.asarray(tokens, np.float32), np.asarray(mask, bool)
            for i, caption in enumerate(chunk):
                self._cache[caption] = (tokens[i], mask[i])
        return (np.stack([self._cache[c][0] for c in captions]),
                np.stack([self._cache[c][1] for c in captions]))
