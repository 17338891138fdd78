"""Context parallelism: attention over tokens split along the `sequence` mesh axis ('ulysses', 'ring') is
the function unsplit attention computes, values and gradients, for every mask the DiT uses; and a DiT
run with either equals one run without a mesh."""

import contextlib
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import moving_shapes
from sora_jax.models.attention import attention
from sora_jax.models.dit import DiT
from sora_jax.parallel.mesh import DEFAULT_RULES, make_mesh
from sora_jax.training.experiment import validate

METHODS = ("ulysses", "ring")
# 2-way data x 4-way sequence parallel: each device holds 8 of the 32 tokens of one row.
MESH = dict(data=2, sequence=4)
BATCH, LENGTH, HEADS, HEAD_DIM, TEXT_LEN = 2, 32, 4, 8, 12
# Row 0: clips of 10 and 17 tokens, then 5 padding (id 0); row 1: one clip of 31 tokens and 1 padding.
IDS = np.zeros((BATCH, LENGTH), np.int32)
IDS[0, :10], IDS[0, 10:27], IDS[1, :31] = 1, 2, 1
# Key padding. Alone, row 1 masks every key; with IDS, row 0 masks every key of clip 2. Those queries
# see no key at all, and get the mean of all values of their row.
KEY_MASK = np.random.default_rng(3).random((BATCH, 1, 1, LENGTH)) > 0.3
KEY_MASK[1] = False
PACKED_KEY_MASK = KEY_MASK.copy()
PACKED_KEY_MASK[0, ..., 10:27], PACKED_KEY_MASK[1] = False, True
UNSEEING = {"key_padding": (1, slice(None)), "packed": (0, slice(10, 27))}  # (row, queries)
# Packed captions: row 0 has clip 1's 5 tokens, clip 2's 4, then 3 padding; row 1 clip 1's 12 tokens,
# the last 4 masked (the text encoder's padding). Row 1's padding query (id 0) sees no text key.
TEXT_IDS = np.array([[1] * 5 + [2] * 4 + [0] * 3, [1] * 12], np.int32)
TEXT_MASK = np.ones((BATCH, 1, 1, TEXT_LEN), bool)
TEXT_MASK[1, ..., 8:] = False
CASES = {
    "plain": dict(),
    "packed": dict(q_segment_ids=IDS, mask=PACKED_KEY_MASK),
    "key_padding": dict(mask=KEY_MASK),
    "cross": dict(q_segment_ids=IDS, kv_segment_ids=TEXT_IDS, mask=TEXT_MASK, kv_replicated=True),
}


def _normal(seed, shape):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(MESH)


def _qkv(case):
    kv_len = TEXT_LEN if case == "cross" else LENGTH
    return (_normal(0, (BATCH, LENGTH, HEADS, HEAD_DIM)), _normal(1, (BATCH, kv_len, HEADS, HEAD_DIM)),
            _normal(2, (BATCH, kv_len, HEADS, HEAD_DIM)))


def _value_and_grads(case, method):
    """A jitted (out, (dq, dk, dv)) of a loss that weighs every output element differently."""
    weights = _normal(4, (BATCH, LENGTH, HEADS, HEAD_DIM))

    def loss(q, k, v):
        out = attention(q, k, v, context_parallel=method, **CASES[case])
        return jnp.sum(weights * out * jnp.cos(out)), out

    grads = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)
    return jax.jit(lambda *qkv: grads(*qkv)[::-1])


@functools.cache
def _reference(case):
    """Unsplit attention on one device, with the 'xla' backend: the function to match."""
    return jax.device_get(_value_and_grads(case, "none")(*_qkv(case)))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", CASES)
def test_split_attention_equals_unsplit_attention_values_and_gradients(mesh, case, method):
    with jax.set_mesh(mesh):
        fn = _value_and_grads(case, method)
        out, grads = jax.device_get(fn(*_qkv(case)))
        hlo = fn.lower(*_qkv(case)).as_text()
    ref_out, ref_grads = _reference(case)
    np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=1e-5)
    for name, grad, ref in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(grad, ref, atol=1e-5, rtol=1e-5, err_msg=f"d{name}")
    if case in UNSEEING:  # The convention itself, held to independently of the reference.
        row, queries = UNSEEING[case]
        v = _qkv(case)[2][row]
        np.testing.assert_allclose(out[row, queries], np.broadcast_to(v.mean(0), out[row, queries].shape),
                                   atol=1e-5)
    # The split really happens: cross-attention needs no communication, self-attention its own kind.
    collectives = {"ulysses": "all_to_all", "ring": "collective_permute"}
    assert (collectives[method] in hlo) == (case != "cross")


def test_bfloat16_ring_self_and_cross_attention_gradients_match(mesh):
    """bf16 operands, as on accelerators (and in the CPU configs): the ring's own backward casts, and
    the cross-attention's context gradients, summed over the sequence axis, compile and agree."""
    inputs = [jnp.asarray(x, jnp.bfloat16) for case in ("packed", "cross") for x in _qkv(case)]

    def grads(method):
        def loss(qkv_self, qkv_cross):
            outs = (attention(*qkv_self, context_parallel=method, **CASES["packed"]),
                    attention(*qkv_cross, context_parallel=method, **CASES["cross"]))
            return sum(jnp.sum(jnp.sin(out.astype(jnp.float32))) for out in outs)
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(inputs[:3], inputs[3:])

    expected = jax.device_get(grads("none"))
    with jax.set_mesh(mesh):
        got = jax.device_get(grads("ring"))
    for grad, ref in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        assert grad.dtype == jnp.bfloat16
        np.testing.assert_allclose(grad.astype(np.float32), ref.astype(np.float32), atol=0.05, rtol=0.05)


@pytest.mark.parametrize("method", METHODS)
def test_without_a_split_sequence_axis_context_parallel_is_ordinary_attention(method):
    q = jax.ShapeDtypeStruct((BATCH, LENGTH, HEADS, HEAD_DIM), jnp.float32)
    lowered = lambda m: jax.jit(functools.partial(attention, q_segment_ids=IDS, context_parallel=m)
                                ).lower(q, q, q).as_text()
    # No mesh, and a mesh whose sequence axis has one device: the very program of unsplit attention.
    for active in (contextlib.nullcontext(), jax.set_mesh(make_mesh(dict(data=8)))):
        with active:
            assert lowered(method) == lowered("none")


@pytest.mark.parametrize("method, kwargs, shapes, match", [
    ("ulysses", {}, dict(heads=2), "2 heads .* use context_parallel='ring'"),
    ("ring", {}, dict(length=30), "30 tokens .* pad the sequence to a multiple of 4"),
    ("ring", dict(mask=np.ones((BATCH, 1, LENGTH, LENGTH), bool)), {}, "only as key padding"),
    ("ulysses", dict(bias=np.zeros((1, HEADS, LENGTH, LENGTH), np.float32)), {}, "takes no bias"),
    ("sideways", {}, {}, "unknown context_parallel 'sideways'; valid: none, ulysses, ring"),
])
def test_bad_inputs_are_refused_with_the_fix(mesh, method, kwargs, shapes, match):
    shape = (BATCH, shapes.get("length", LENGTH), shapes.get("heads", HEADS), HEAD_DIM)
    q = jax.ShapeDtypeStruct(shape, jnp.float32)
    with jax.set_mesh(mesh), pytest.raises(ValueError, match=match):
        jax.eval_shape(functools.partial(attention, context_parallel=method, **kwargs), q, q, q)


def test_config_names_a_bad_context_parallel_setting():
    config = moving_shapes.get_config("runlocal,pixels")
    config.model.context_parallel = "rings"
    with pytest.raises(ValueError, match="config.model.context_parallel='rings'; valid: 'none'"):
        validate(config)
    config.model.update(context_parallel="ulysses", num_heads=2)
    config.mesh.update(data=2, sequence=4)
    with pytest.raises(ValueError, match="num_heads=2 is not divisible by config.mesh.sequence=4"):
        validate(config)


def test_dit_with_split_tokens_equals_the_dit_on_one_device(mesh):
    """Width 32, depth 2, 4 heads on 2 frames of 4x4 latents (32 tokens), one caption padded."""
    model = dict(in_channels=4, patch_size=(1, 1, 1), width=32, depth=2, num_heads=4, text_dim=8,
                 scan_layers=True)
    rng = np.random.default_rng(5)
    x, text = _normal(6, (BATCH, 2, 4, 4, 4)), _normal(7, (BATCH, 5, 8))
    t, text_mask = rng.uniform(size=(BATCH, 2)).astype(np.float32), np.arange(5) < np.array([[5], [2]])
    # Parameters as after training (every zero-initialised gate open), without compiling init.
    abstract = jax.eval_shape(DiT(**model).init, jax.random.key(0), x, t, text, text_mask)
    params = jax.tree.map(lambda p: 0.3 * _normal(p.size, p.shape) + 0.5, nn.unbox(abstract)["params"])

    args = (params, x, t, text, text_mask)

    def forward(method):
        dit = DiT(**model, context_parallel=method)
        return jax.jit(lambda params, *inputs: dit.apply({"params": params}, *inputs))

    expected = forward("none")(*args)
    for method, collective in zip(METHODS, ("all_to_all", "collective_permute")):
        with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
            fn = forward(method)
            out = fn(*args)
            assert collective in fn.lower(*args).as_text()
        np.testing.assert_allclose(out, expected, atol=1e-4, rtol=1e-4, err_msg=method)
