"""Attention with segment ids (NaViT packing): a packed sequence gives each clip what it would get alone,
on every backend that runs on the CPU ('splash' through the Pallas interpreter)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax.models.attention import attention

CPU_BACKENDS = ("xla", "cpu", "splash")
# Output tolerance against the 'xla' reference; 'cpu' has bf16 operands. Gradients: relative to their max.
ATOL = {"xla": 1e-5, "cpu": 3e-2, "splash": 1e-4}
HEADS, HEAD_DIM = 2, 8
# Two packed sequences of 120 video tokens (not a multiple of splash's 128-token blocks, so it pads):
# clip lengths per row, the rest padding (id 0).
VIDEO_LEN, CLIPS = 120, ((37, 50, 23), (60, 41))
# Each clip's caption: (real tokens, the text encoder's padding, masked out), packed into 20 text tokens.
# Row 0 ends in text padding (id 0); row 1 has none, so its padding queries see no key at all.
TEXT_LEN, CAPTIONS = 20, (((4, 1), (6, 3), (3, 0)), ((7, 2), (9, 2)))


def _normal(seed, shape):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _segment_ids(lengths_per_row, total):
    """int32 [rows, total]: the i-th run of tokens gets id i + 1, the rest 0."""
    return np.array([np.concatenate([np.full(n, i + 1) for i, n in enumerate(row)]
                                    + [np.zeros(total - sum(row))]) for row in lengths_per_row], np.int32)


def _spans(lengths):
    starts = np.cumsum((0,) + tuple(lengths))
    return [slice(a, b) for a, b in zip(starts[:-1], starts[1:])]


def _loss(out, weights):
    return jnp.sum(weights[:, :, None, None] * out * jnp.cos(out))


VIDEO_IDS = _segment_ids(CLIPS, VIDEO_LEN)
TEXT_IDS = _segment_ids([[real + pad for real, pad in row] for row in CAPTIONS], TEXT_LEN)
TEXT_MASK = np.array([np.concatenate([np.arange(real + pad) < real for real, pad in row]
                                     + [np.ones(TEXT_LEN - sum(map(sum, row)), bool)])
                      for row in CAPTIONS])[:, None, None, :]


def _inputs(kind):
    lk = VIDEO_LEN if kind == "self" else TEXT_LEN
    return (_normal(0, (2, VIDEO_LEN, HEADS, HEAD_DIM)), _normal(1, (2, lk, HEADS, HEAD_DIM)),
            _normal(2, (2, lk, HEADS, HEAD_DIM)))


def _pieces(kind):
    """For each clip: (row, its video tokens, the tokens it attends to)."""
    for row, (lengths, captions) in enumerate(zip(CLIPS, CAPTIONS)):
        caption_spans = _spans([real + pad for real, pad in captions])
        for span, caption, (real, _) in zip(_spans(lengths), caption_spans, captions):
            # A caption without its masked padding.
            yield row, span, span if kind == "self" else slice(caption.start, caption.start + real)


@functools.cache
def _packed(backend, kind):
    """Packed self- or cross-attention: (out, grads) for the loss over the clips' tokens."""
    kwargs = (dict(q_segment_ids=VIDEO_IDS) if kind == "self" else
              dict(q_segment_ids=VIDEO_IDS, kv_segment_ids=TEXT_IDS, mask=TEXT_MASK))

    def loss(q, k, v):
        out = attention(q, k, v, backend=backend, **kwargs)
        return _loss(out, (VIDEO_IDS > 0).astype(np.float32)), out

    grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(*_inputs(kind))
    return jax.device_get((out, grads))  # numpy: indexing jax arrays would compile a program per index.


@functools.cache
def _one_by_one(kind):
    """'xla' attention of each clip on its own, without segment ids: [(out, grads)] for the loss over all
    its tokens. Each clip gets a row of its own, padded at the end, with its padding masked and out of the
    loss (one program for all clips: compiling one per clip would dominate the test's time)."""
    q, k, v = _inputs(kind)
    pieces = [(row, queries, keys, queries.stop - queries.start, keys.stop - keys.start)
              for row, queries, keys in _pieces(kind)]
    lq, lk = max(p[3] for p in pieces), max(p[4] for p in pieces)
    rows_q = np.zeros((len(pieces), lq, HEADS, HEAD_DIM), np.float32)
    rows_k, rows_v = np.zeros((2, len(pieces), lk, HEADS, HEAD_DIM), np.float32)
    real_q, real_k = np.zeros((len(pieces), lq), np.float32), np.zeros((len(pieces), lk), bool)
    for i, (row, queries, keys, n, m) in enumerate(pieces):
        rows_q[i, :n], rows_k[i, :m], rows_v[i, :m] = q[row, queries], k[row, keys], v[row, keys]
        real_q[i, :n], real_k[i, :m] = 1.0, True

    def loss(q, k, v):
        out = attention(q, k, v, mask=real_k[:, None, None, :], backend="xla")
        return _loss(out, real_q), out

    grads, out = jax.device_get(jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(
        rows_q, rows_k, rows_v))
    return [(out[i:i + 1, :n], (grads[0][i:i + 1, :n], grads[1][i:i + 1, :m], grads[2][i:i + 1, :m]))
            for i, (_, _, _, n, m) in enumerate(pieces)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["self", "cross"])
def test_packed_self_and_cross_attention_equal_each_clip_alone(backend, kind):
    """Self-attention stays within a clip; cross-attention sees only the clip's own caption, without the
    caption's masked padding and the text padding."""
    out, grads = _packed(backend, kind)
    for (row, queries, keys), (ref_out, ref_grads) in zip(_pieces(kind), _one_by_one(kind)):
        np.testing.assert_allclose(out[row:row + 1, queries], ref_out, atol=ATOL[backend])
        for g, tokens, ref in zip(grads, (queries, keys, keys), ref_grads):
            np.testing.assert_allclose(g[row:row + 1, tokens], ref,
                                       atol=ATOL[backend] * max(1.0, np.max(np.abs(ref))))
    # Keys no clip attends to (padding; masked caption tokens) get no gradient.
    unseen = VIDEO_IDS == 0 if kind == "self" else (TEXT_IDS == 0) | ~TEXT_MASK[:, 0, 0]
    for g in grads[1:]:
        np.testing.assert_array_equal(g[unseen], 0.0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["self", "cross"])
def test_padding_queries_get_finite_outputs_and_gradients(backend, kind):
    # In cross-attention, row 1's padding queries have no key with their id (0) at all.
    out, grads = _packed(backend, kind)
    assert np.all(np.isfinite(out[VIDEO_IDS == 0]))
    for g in grads:
        assert np.all(np.isfinite(g))


def test_splash_without_segment_ids_matches_xla_with_key_padding():
    q = _normal(3, (2, 10, HEADS, HEAD_DIM))
    k, v = _normal(4, (2, 7, HEADS, HEAD_DIM)), _normal(5, (2, 7, HEADS, HEAD_DIM))
    mask = (np.arange(7) < np.array([7, 3])[:, None])[:, None, None, :]
    for kwargs in (dict(), dict(mask=mask, scale=1.0)):
        run = lambda backend: jax.jit(functools.partial(attention, backend=backend, **kwargs))(q, k, v)
        np.testing.assert_allclose(run("splash"), run("xla"), atol=1e-5)


def test_attention_rejects_bad_segment_ids_and_what_splash_cannot_do():
    q = k = v = _normal(6, (2, 10, HEADS, HEAD_DIM))
    text = _normal(7, (2, 4, HEADS, HEAD_DIM))
    ids = np.ones((2, 10), np.int32)
    with pytest.raises(ValueError, match=r"q_segment_ids must be int \[batch, length\] = \[2, 10\]"):
        attention(q, k, v, q_segment_ids=ids[:, :9])
    with pytest.raises(ValueError, match="q_segment_ids must be int"):
        attention(q, k, v, q_segment_ids=ids.astype(np.float32))
    with pytest.raises(ValueError, match=r"kv_segment_ids must be int \[batch, length\] = \[2, 4\]"):
        attention(q, text, text, q_segment_ids=ids, kv_segment_ids=ids)
    with pytest.raises(ValueError, match="pass kv_segment_ids for cross-attention"):
        attention(q, text, text, q_segment_ids=ids)
    with pytest.raises(ValueError, match="kv_segment_ids given without q_segment_ids"):
        attention(q, k, v, kv_segment_ids=ids)
    with pytest.raises(ValueError, match="'splash' takes no bias"):
        attention(q, k, v, bias=np.zeros((1, HEADS, 10, 10), np.float32), backend="splash")
    with pytest.raises(ValueError, match="'splash' takes a mask only as key padding"):
        attention(q, k, v, mask=np.tril(np.ones((10, 10), bool))[None, None], backend="splash")
