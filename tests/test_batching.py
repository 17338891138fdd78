"""Batchers of clips of many sizes: padding, buckets and packing under one token budget."""

import itertools

import numpy as np
import pytest

from sora_jax.data import batching, packing

PATCH = (1, 1, 1)
# Latent (t, h, w) sizes, as a mixed dataset's clips make them: an image, landscape, portrait, long.
SIZES = [(1, 4, 4), (3, 4, 8), (3, 8, 4), (5, 4, 4), (2, 4, 4)]


def clips(num, seed=0):
    rng = np.random.default_rng(seed)
    for i in range(num):
        t, h, w = SIZES[rng.integers(len(SIZES))]
        yield {"latent": np.full((t, h, w, 2), float(i), np.float32), "text": np.ones((3, 4)),
               "text_mask": np.array([True, True, False]), "frames": 1 + 4 * (t - 1), "fps": 8.0,
               "height": 4 * h, "width": 4 * w, "index": i}


def batcher(kind, **kw):
    kw = dict(tokens_per_batch=1024, seq_len=256, max_clips=8, max_slots=16, patch_size=PATCH,
              text_len=3, row_multiple=2) | kw
    return batching.Batcher(kind, **kw)


def clip_indices(batch):
    return sorted(int(batch["tokens"][r, i, 0]) for r, i in zip(*np.nonzero(
        np.diff(batch["segment_ids"], prepend=0, axis=1) != 0)) if batch["segment_ids"][r, i])


@pytest.mark.parametrize("kind", batching.BATCHINGS)
def test_every_batch_fits_the_budget_and_clips_appear_once_in_order_of_reading(kind):
    batches = list(itertools.islice(batcher(kind)(clips(400)), 12))
    seen = []
    for batch in batches:
        rows, length = batch["segment_ids"].shape
        assert rows * length <= 1024 and rows % 2 == 0
        assert (batch["segment_ids"] > 0).sum(axis=1).max() <= length
        seen += clip_indices(batch)
    assert len(seen) == len(set(seen))  # no clip twice
    if kind != "bucket":  # buckets hold clips back until their size fills a batch
        assert max(seen) < len(seen) + 8


def test_buckets_hold_one_size_without_padding_and_rows_from_the_budget():
    for batch in itertools.islice(batcher("bucket")(clips(400)), 10):
        assert packing.packing_efficiency(batch) == 1.0
        shapes = {tuple(s) for s in batch["latent_shape"][:, 0]}
        assert len(shapes) == 1
        tokens = int(np.prod(next(iter(shapes))[:3]))
        assert batch["segment_ids"].shape == (1024 // tokens // 2 * 2, tokens)


def test_packing_wastes_far_less_than_padding_on_mixed_sizes():
    efficiency = {kind: np.mean([packing.packing_efficiency(b) for b in itertools.islice(
        batcher(kind)(clips(600)), 10)]) for kind in ("pad", "pack")}
    assert efficiency["pack"] >= 0.9
    # Padding every clip (16 to 96 tokens) to the packing length leaves most of every row empty.
    assert efficiency["pad"] < 0.5


def test_a_clip_longer_than_the_packing_length_is_refused_naming_the_setting():
    long = {"latent": np.zeros((9, 8, 8, 2)), "text": np.ones((3, 4)), "text_mask": np.ones(3, bool),
            "frames": 33, "fps": 8.0, "height": 32, "width": 32}
    with pytest.raises(ValueError, match=r"576 tokens, more than seq_len=256.*config.data.seq_len"):
        next(batcher("pack")([long]))


def test_a_budget_without_room_for_a_row_is_refused():
    with pytest.raises(ValueError, match="holds no row"):
        batcher("pack", tokens_per_batch=200)
    with pytest.raises(ValueError, match="Unknown batching"):
        batcher("stack")


@pytest.mark.parametrize("kind", batching.BATCHINGS)
def test_a_finite_split_is_batched_whole_with_the_last_batches_partly_filled(kind):
    batches = list(batcher(kind)(clips(37)))
    seen = [i for batch in batches for i in clip_indices(batch)]
    assert sorted(seen) == list(range(37))
    assert all(b["segment_ids"].shape[0] % 2 == 0 for b in batches)
