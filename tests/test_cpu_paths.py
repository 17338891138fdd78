"""The CPU fast paths: the custom-gradient matmuls' compiled form (their values: tests/test_models.py),
the 'cpu' attention backend in f32, and the gradient barrier that keeps XLA's CPU compiler from
recomputing residual-gradient chains."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from sora_jax.models import layers
from sora_jax.models.attention import attention

def _normal(seed, shape):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _plain_dots(matmul):
    """Dots of an MLP's compiled gradient that XLA's CPU compiler leaves to its generic matmul
    rather than to its fast library (which runs them as fusions)."""
    def loss(x, w1, w2):
        dot = layers.dense_dot_general(matmul)
        h = dot(x, w1, (((1,), (0,)), ((), ())))
        return jnp.sum(dot(jnp.tanh(h), w2, (((1,), (0,)), ((), ()))) ** 2)

    args = (jnp.ones((256, 32)), jnp.ones((32, 128)), jnp.ones((128, 32)))
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile().as_text()
    entry = hlo[hlo.index("ENTRY"):]
    return len(re.findall(r" dot\(", entry))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA's CPU compiler")
def test_f32_matmul_keeps_every_backward_dot_on_the_fast_library():
    assert _plain_dots("default") > 0  # XLA's own backward reads a transposed operand
    assert _plain_dots("f32") == 0
    assert _plain_dots("bf16") == 0


def test_dense_rejects_an_unknown_matmul_naming_the_valid_ones():
    with pytest.raises(ValueError, match="valid: default, bf16, f32"):
        layers.dense_dot_general("fp8")


@pytest.mark.parametrize("mask", [None, "key_padding"])
def test_cpu_attention_computes_in_f32_for_f32_inputs_and_in_bf16_for_bf16(mask):
    shape = (2, 12, 2, 8)
    q, k, v = (_normal(i, shape) for i in range(3))
    mask = None if mask is None else (jnp.arange(12) < jnp.array([12, 5])[:, None])[:, None, None, :]

    def run(backend, dtype):
        def loss(q, k, v):
            out = attention(q.astype(dtype), k.astype(dtype), v.astype(dtype), mask=mask,
                            backend=backend).astype(jnp.float32)
            return jnp.sum(out * jnp.cos(out)), out
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)

    ref_grads, ref_out = run("xla", jnp.float32)
    grads, out = run("cpu", jnp.float32)
    np.testing.assert_allclose(out, ref_out, atol=1e-5)
    for g, ref in zip(grads, ref_grads):
        np.testing.assert_allclose(g, ref, atol=1e-5)
    grads16, out16 = run("cpu", jnp.bfloat16)
    error = float(jnp.max(jnp.abs(out16 - ref_out)))
    assert 1e-4 < error < 5e-2  # bf16 operands: a few bf16 ulps, not f32 accuracy
    for g, ref in zip(grads16, ref_grads):
        np.testing.assert_allclose(g, ref, atol=5e-2 * float(jnp.max(jnp.abs(ref))))


def _residual_chain(barrier, depth):
    """The gradient of a stack of `depth` residual blocks, x + gate * tanh(w * norm(x)), as in a
    transformer: each block's backward reads the residual gradient in its norm's and its gate's."""
    def loss(ws, gates, x):
        for w, gate in zip(ws, gates):
            x = barrier(x)
            centred = x - jnp.mean(x, axis=-1, keepdims=True)
            norm = centred * lax.rsqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True) + 1e-6)
            x = x + gate * jnp.tanh(w * norm)
        return jnp.sum(x * jnp.cos(x))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _chain_args(depth):
    return _normal(0, (depth, 16, 32)), _normal(1, (depth, 32)), _normal(2, (16, 32))


def test_gradient_barrier_is_the_identity_forward_and_backward():
    x = _normal(0, (16, 32))
    np.testing.assert_array_equal(jax.jit(layers.gradient_barrier)(x), x)
    grads = _residual_chain(layers.gradient_barrier, 4)(*_chain_args(4))
    for g, ref in zip(grads, _residual_chain(lambda x: x, 4)(*_chain_args(4))):
        np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA's CPU compiler")
def test_gradient_barrier_keeps_the_backward_linear_in_depth():
    def multiplies(barrier, depth):
        """Multiplications in the compiled gradient: a recomputed chain repeats its products."""
        hlo = _residual_chain(barrier, depth).lower(*_chain_args(depth)).compile().as_text()
        return hlo.count(" multiply(")

    plain = [multiplies(lambda x: x, depth) for depth in (4, 8)]
    barrier = [multiplies(layers.gradient_barrier, depth) for depth in (4, 8)]
    assert plain[1] > 2.5 * plain[0]  # without it, twice the blocks cost more than twice the work
    assert barrier[1] < 2.2 * barrier[0] and barrier[1] < plain[1] / 2
