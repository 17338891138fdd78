"""Splash attention on a sharded mesh: one kernel per device, on that device's examples and heads
(`shard_map` over the batch and heads axes of the arrays' layout), computing what the kernel computes
on whole arrays; alone and inside context parallelism, and in the DiT."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from sora_jax.models import attention as attention_lib
from sora_jax.models.dit import DiT
from sora_jax.parallel.mesh import DEFAULT_RULES, make_mesh

# 2-way data x 2-way tensor x 2-way sequence: a device holds 2 of the 4 examples and 2 of the 4 heads.
MESH = dict(data=2, tensor=2, sequence=2)
SPEC = P(("data", "fsdp"), "sequence", "tensor", None)  # the DiT's layout under DEFAULT_RULES
BATCH, LENGTH, HEADS, HEAD_DIM, TEXT_LEN = 4, 40, 4, 8, 6
IDS = np.zeros((BATCH, LENGTH), np.int32)  # packed rows: two clips, one clip, one clip and padding
IDS[0, :15], IDS[0, 15:], IDS[1:3], IDS[3, :29] = 1, 2, 1, 1
KEY_MASK = np.random.default_rng(3).random((BATCH, 1, 1, LENGTH)) > 0.3
# Captions: row 0's two, then one per row; row 3's padding queries (id 0) see its padding key.
TEXT_IDS = np.array([[1, 1, 1, 2, 2, 2]] + [[1] * 6] * 2 + [[1] * 5 + [0]], np.int32)
CASES = {
    "plain": dict(),
    "packed": dict(q_segment_ids=IDS),
    "key_padding": dict(mask=KEY_MASK),
    "cross": dict(q_segment_ids=IDS, kv_segment_ids=TEXT_IDS),
}


def _normal(seed, shape):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(MESH)


@pytest.fixture
def kernel_heads(monkeypatch):
    """The number of heads of every splash kernel built: what one device's kernel computes."""
    built, make = [], attention_lib._splash_kernel
    monkeypatch.setattr(attention_lib, "_splash_kernel",
                        lambda heads, *args: built.append(heads) or make(heads, *args))
    return built


def _value_and_grads(case, **kwargs):
    kv_len = TEXT_LEN if case == "cross" else LENGTH
    q = _normal(0, (BATCH, LENGTH, HEADS, HEAD_DIM))
    k, v = _normal(1, (BATCH, kv_len, HEADS, HEAD_DIM)), _normal(2, (BATCH, kv_len, HEADS, HEAD_DIM))
    weights = _normal(4, q.shape)

    def loss(q, k, v):
        out = attention_lib.attention(q, k, v, **CASES[case], **kwargs)
        return jnp.sum(weights * out * jnp.cos(out)), out

    grads = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)
    fn = jax.jit(lambda *qkv: grads(*qkv)[::-1])
    return fn, jax.device_get(fn(q, k, v)), (q, k, v)


@pytest.mark.parametrize("case", CASES)
def test_splash_per_shard_equals_attention_on_one_device(mesh, kernel_heads, case):
    _, expected, _ = _value_and_grads(case, backend="xla")
    with jax.set_mesh(mesh):
        fn, got, args = _value_and_grads(case, backend="splash", spec=SPEC,
                                         kv_replicated=case == "cross")
        hlo = fn.lower(*args).as_text()
    assert set(kernel_heads) == {HEADS // MESH["tensor"]}, kernel_heads
    assert "all-gather" not in hlo and "all_gather" not in hlo
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4), got, expected)


def test_splash_inside_ulysses_splits_the_heads_again(mesh, kernel_heads):
    """Ulysses trades the sequence split for a heads split; splash then takes the tensor split too."""
    _, expected, _ = _value_and_grads("packed", backend="xla")
    with jax.set_mesh(mesh):
        _, got, _ = _value_and_grads("packed", backend="splash", spec=SPEC, context_parallel="ulysses")
    assert set(kernel_heads) == {HEADS // MESH["sequence"] // MESH["tensor"]}, kernel_heads
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4), got, expected)


def test_axes_that_do_not_divide_are_left_whole(mesh, kernel_heads):
    """3 heads do not split 2 ways: each device's kernel takes all of them, and the result holds."""
    q, k, v = (_normal(i, (BATCH, LENGTH, 3, HEAD_DIM)) for i in range(3))
    expected = attention_lib.attention(q, k, v, q_segment_ids=IDS)
    with jax.set_mesh(mesh):
        got = jax.jit(lambda q, k, v: attention_lib.attention(
            q, k, v, q_segment_ids=IDS, backend="splash", spec=SPEC))(q, k, v)
    assert set(kernel_heads) == {3}
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_dit_with_splash_on_a_mesh_equals_the_dit_on_one_device(mesh, kernel_heads):
    """Width 32, depth 2, 4 heads on 2 frames of 4x4 latents (32 tokens), one caption padded; the
    DiT gives splash its layout from the logical axis rules."""
    model = dict(in_channels=4, patch_size=(1, 1, 1), width=32, depth=2, num_heads=4, text_dim=8,
                 scan_layers=True)
    rng = np.random.default_rng(5)
    x, text = _normal(6, (BATCH, 2, 4, 4, 4)), _normal(7, (BATCH, 5, 8))
    t = rng.uniform(size=(BATCH, 2)).astype(np.float32)
    text_mask = np.arange(5) < np.array([[5], [2], [4], [1]])
    abstract = jax.eval_shape(DiT(**model).init, jax.random.key(0), x, t, text, text_mask)
    params = jax.tree.map(lambda p: 0.3 * _normal(p.size, p.shape) + 0.5, nn.unbox(abstract)["params"])
    args = (params, x, t, text, text_mask)

    def forward(**kwargs):
        dit = DiT(**model, **kwargs)
        return jax.jit(lambda params, *inputs: dit.apply({"params": params}, *inputs))

    expected = forward()(*args)
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        out = forward(attention_backend="splash")(*args)
    assert set(kernel_heads) == {HEADS // MESH["tensor"]}, kernel_heads
    np.testing.assert_allclose(out, expected, atol=1e-4, rtol=1e-4)
