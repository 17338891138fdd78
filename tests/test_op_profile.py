"""The per-operation profile's reading of a compiled program and of overlapping trace events
(benchmarks/op_profile.py, behind profile_step.py and compare_pytorch.py --profile)."""

import jax
import jax.numpy as jnp
import pytest

from benchmarks import op_profile


def test_hlo_operations_count_each_matmuls_flops_and_mark_batched_ones():
    def f(x, w, q, k):
        dense = jnp.tanh(x @ w)  # [32, 48] x [48, 16]: no batch dimension
        scores = jnp.einsum("nqd,nkd->nqk", q, k)  # 3 x [8, 4] x [4, 8]: batched
        return dense.sum() + scores.sum()

    shapes = [(32, 48), (48, 16), (3, 8, 4), (3, 8, 4)]
    text = jax.jit(f).lower(*(jnp.ones(s) for s in shapes)).compile().as_text()
    ops = op_profile.hlo_operations(text)
    with_flops = {name: op for name, op in ops.items() if op["flops"]}
    # The dots may sit in fusions; whichever instruction holds each, its FLOPs are counted once
    # at the top level (the fusion), and once more as the dot inside the fused computation.
    dense = [op for op in with_flops.values() if op["flops"] == 2 * 32 * 48 * 16]
    batched = [op for op in with_flops.values() if op["flops"] == 2 * 3 * 8 * 8 * 4]
    assert dense and not any(op["batched"] for op in dense)
    assert batched and all(op["batched"] for op in batched)
    assert all(op["op"] for op in ops.values())


def test_shared_times_split_overlapping_intervals_evenly():
    events = [(0.0, 10.0, "a"), (5.0, 15.0, "b"), (20.0, 30.0, "c")]
    times = op_profile.shared_times(events)
    # a alone 5, a and b together 5 (2.5 each), b alone 5; c alone 10; gaps count for nobody.
    assert times == pytest.approx({"a": 7.5, "b": 7.5, "c": 10.0})
    assert sum(times.values()) == pytest.approx(25.0)  # the busy wall time


def test_groups_name_the_direction_and_the_module_path():
    group = op_profile._group
    assert group("jit(train_step)/transpose(jvp(DiT))/DiT._forward/closed_call/blocks/mlp/fc1/dot_general") \
        == "backward DiT/DiT._forward/blocks/mlp/fc1/dot_general"
    assert group("jit(train_step)/jvp(DiT)/blocks/attn/mul") == "forward DiT/blocks/attn/mul"
    assert group("jit(train_step)/add") == "add"


def test_profile_refuses_to_trace_no_steps():
    step = jax.jit(lambda x: (x + 1, x.sum()))
    with pytest.raises(ValueError, match="at least one step"):
        op_profile.profile(step, (jnp.ones(3),), steps=0)
