"""Random conditioning masks: which temporal positions of a clip are given rather than generated.

Training on random masks lets one model be prompted with frames: animate an image (first_frame),
extend a clip forwards (prefix) or backwards (suffix), connect two clips or close a loop
(first_last), fill in frames (random). Given positions are clean (t = 0) and left out of the loss;
the model generates the rest.

A position is one temporal token position: pt latent frames (the DiT's temporal patch). With a
causal VAE position 0 holds the first frame, which it encodes on its own, so first_frame gives
exactly one pixel frame when pt = 1. For a clip of `length` positions, each strategy gives:

    none         nothing
    first_frame  position 0
    last_frame   position length - 1
    first_last   positions 0 and length - 1
    end_image    positions 0 and length - 1, the last holding the clip's end image instead of its
                 latent frame: the frame at which position length - 2 ends, encoded on its own by a
                 causal VAE (the batch's `end_latent`; `with_end_image`). A connection or loop gives
                 the next clip's first frame so, which the DiT then sees (prompting.py).
    prefix       the first k positions, k uniform in [1, length - 1]
    suffix       the last k positions, k uniform in [1, length - 1]
    random       each position independently with probability 1/2

Every clip keeps at least one generated position: a draw that would give all of them (a clip of
length 1, i.e. an image, under any strategy; first_last at length 2; random with every coin
heads) instead leaves one of them, chosen uniformly, generated. So an image is never given
anything, and first_last at length 2 becomes first_frame or last_frame with equal chance (end_image
likewise; a clip of 2 positions never draws its end image).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp

MASK_STRATEGIES = ("none", "first_frame", "last_frame", "first_last", "end_image", "prefix", "suffix",
                   "random")


def check_mask_weights(weights: Mapping[str, float] | None) -> dict[str, float] | None:
    """Validates relative strategy weights {strategy: weight}; None or {} (no masks) gives None.

    Raises ValueError for an unknown strategy, a negative or non-finite weight, or all-zero weights.
    """
    if not weights:
        return None
    checked = {}
    for name, weight in weights.items():
        if name not in MASK_STRATEGIES:
            raise ValueError(f"Unknown mask strategy {name!r}; valid: {', '.join(MASK_STRATEGIES)}.")
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            raise ValueError(f"Mask weight {name!r} must be a number, got {weight!r}.") from None
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"Mask weight {name!r} must be finite and non-negative, got {weight}.")
        checked[name] = weight
    if not any(checked.values()):
        raise ValueError(f"Mask weights {checked} are all zero; give some strategy a positive weight "
                         f"(or no weights for no masks).")
    return checked


def sample_given(rng: jax.Array, weights: Mapping[str, float], lengths: jax.Array,
                 max_len: int, *, return_end_image: bool = False):
    """Which temporal positions of N clips are given, with strategies drawn in proportion to weights.

    Args:
      rng: PRNG key.
      weights: {strategy: relative weight}, checked by `check_mask_weights`; empty gives nothing.
      lengths: int [N] in [0, max_len], each clip's number of temporal positions.
      max_len: static number of positions per row of the result.
      return_end_image: also return which clips hold their end image at position length - 1.
    Returns bool [N, max_len]; positions at or beyond a clip's length are never given, and at least
    one position of every clip with length >= 1 is generated (see the module docstring). With
    return_end_image, (that, bool [N]).
    """
    lengths = jnp.asarray(lengths, jnp.int32)
    n = lengths.shape[0]
    weights = check_mask_weights(weights)
    if weights is None:
        given = jnp.zeros((n, max_len), bool)
        return (given, jnp.zeros((n,), bool)) if return_end_image else given
    names = [name for name in MASK_STRATEGIES if weights.get(name, 0.0) > 0]
    rng_strategy, rng_k, rng_coins, rng_keep = jax.random.split(rng, 4)
    strategy = jax.random.categorical(
        rng_strategy, jnp.log(jnp.asarray([weights[name] for name in names], jnp.float32)), shape=(n,))

    pos = jnp.arange(max_len)[None]  # [1, max_len]
    length = lengths[:, None]  # [N, 1]
    k = jax.random.randint(rng_k, (n, 1), 1, jnp.maximum(length, 2))  # in [1, length - 1]
    patterns = {
        "none": jnp.zeros((n, max_len), bool),
        "first_frame": pos == 0,
        "last_frame": pos == length - 1,
        "first_last": (pos == 0) | (pos == length - 1),
        "end_image": (pos == 0) | (pos == length - 1),
        "prefix": pos < k,
        "suffix": pos >= length - k,
        "random": jax.random.bernoulli(rng_coins, 0.5, (n, max_len)),
    }
    given = jnp.zeros((n, max_len), bool)
    for i, name in enumerate(names):
        given = jnp.where((strategy == i)[:, None], patterns[name], given)
    real = pos < length
    given = given & real
    # A clip with nothing left to generate has no loss and teaches nothing: un-give one position.
    all_given = jnp.all(given | ~real, axis=1, keepdims=True)
    keep = jax.random.randint(rng_keep, (n, 1), 0, jnp.maximum(length, 1))
    given = given & ~(all_given & (pos == keep))
    if not return_end_image:
        return given
    drew = (strategy == names.index("end_image")) if "end_image" in names else jnp.zeros((n,), bool)
    # Beyond 2 positions its last one always stays given; at 2 the un-giving may take it.
    return given, drew & (lengths > 2)


def with_end_image(latent: jax.Array, end_latent: jax.Array, end_image: jax.Array) -> jax.Array:
    """latent [B, T, ...] with its last frame replaced by end_latent [B, 1, ...] where end_image [B]."""
    last = jnp.where(end_image.reshape((-1,) + (1,) * (latent.ndim - 1)), end_latent, latent[:, -1:])
    return jnp.concatenate([latent[:, :-1], last.astype(latent.dtype)], axis=1)


def sample_slot_given(rng: jax.Array, weights: Mapping[str, float], slot_clip: jax.Array,
                      num_clips: int) -> jax.Array:
    """`sample_given` for packed rows (layout of data/packing.py): one draw per clip, laid out per slot.

    Args:
      rng: PRNG key.
      weights: as `sample_given`'s.
      slot_clip: int [R, K], m + 1 for the clip slot each conditioning slot belongs to, 0 unused. A
        clip's slots are its temporal positions in order.
      num_clips: M, the clip slots per row.
    Returns bool [R, K], True for given slots; unused slots are never given.
    """
    if (weights or {}).get("end_image"):
        raise ValueError("The end_image mask needs clips of one size (packed clips carry no end "
                         "image); drop it from config.train.masks, or unset config.data.batching.")
    rows, slots = slot_clip.shape
    member = slot_clip[..., None] == jnp.arange(1, num_clips + 1)  # [R, K, M]
    lengths = jnp.sum(member, axis=1)  # [R, M]
    # Each slot's temporal position within its clip: the clip's slots before it.
    index = jnp.sum(jnp.cumsum(member, axis=1) * member, axis=-1) - 1  # [R, K], -1 unused
    given = sample_given(rng, weights, lengths.reshape(-1), slots).reshape(rows, num_clips, slots)
    per_slot = given[jnp.arange(rows)[:, None], jnp.maximum(slot_clip - 1, 0), jnp.maximum(index, 0)]
    return per_slot & (slot_clip > 0)
