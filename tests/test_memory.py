"""The memory estimate counts the shards each device holds and follows XLA's analysis of the step."""

import jax
import pytest

from configs import moving_shapes, vae_moving_shapes
from sora_jax.training import memory
from sora_jax.training.experiment import get_experiment


def small_config(**mesh):
    """A small DiT on clips of 5 x 32 x 32 pixels in (1, 2, 2) patches: 1280 tokens per clip."""
    config = moving_shapes.get_config("runlocal,pixels")
    config.model.update(patch_size=(1, 2, 2), width=64, depth=2, num_heads=4)
    config.data.update(frames=5, height=32, width=32, batch_size=4)
    config.mesh = {**dict(data=1, fsdp=1, tensor=1, sequence=1), **mesh}
    return config


def test_state_estimate_is_what_one_device_holds_of_the_real_arrays():
    exp = get_experiment(small_config(fsdp=4, tensor=2))  # 8 emulated devices
    state = exp.init_state(jax.random.key(0))
    group = state.groups["dit"]
    device = exp.mesh.devices.flat[0]
    held = lambda tree: sum(s.data.nbytes for x in jax.tree.leaves(tree)
                            for s in x.addressable_shards if s.device == device)
    estimate = memory.estimate(exp)
    assert estimate["params"] == held(group.params)
    assert estimate["ema_params"] == held(group.ema_params)
    assert estimate["opt_state"] == held(group.opt_state)
    assert estimate["gradients"] == estimate["params"]
    # Sharded: a device holds an eighth of the kernels split over fsdp and tensor, a quarter of
    # those split over fsdp alone, and whole norms.
    total = sum(x.nbytes for x in jax.tree.leaves(group.params))
    assert total / 8 <= estimate["params"] < total / 4


def test_estimate_on_a_larger_mesh_divides_what_that_mesh_splits():
    exp = get_experiment(small_config(fsdp=4, tensor=2))
    here = memory.estimate(exp)
    larger = memory.estimate(exp, dict(data=2, fsdp=8, tensor=2, sequence=1))
    assert larger["devices"] == 32
    # fsdp 4 -> 8 halves what it splits; the MLP kernels go 16 ways instead of 8.
    assert 0.5 * here["params"] < larger["params"] < 0.7 * here["params"]
    kernel = exp.abstract_state().groups["dit"].params["blocks"]["mlp"]["fc1"]["kernel"]
    spec = exp.state_shardings.groups["dit"].params["blocks"]["mlp"]["fc1"]["kernel"].spec
    assert memory.shard_bytes(kernel.shape, kernel.dtype, spec, larger["mesh"]) == kernel.size * 4 // 16
    assert larger["tokens_per_device"] == here["tokens_per_device"]  # no sequence split
    with pytest.raises(ValueError, match="'model'"):
        memory.estimate(exp, dict(data=1, model=8))


def test_whole_step_estimate_is_within_15_percent_of_xla_memory_analysis():
    config = small_config()
    config.model.update(scan_layers=True, remat_policy="full")
    exp = get_experiment(config, jax.devices()[:1])
    state = exp.abstract_state()
    with exp.activate():
        compiled = exp.jit_train_step().lower(state, exp.batch_shapes(), jax.random.key(0)).compile()
    m = compiled.memory_analysis()
    measured = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                - m.alias_size_in_bytes)
    estimate = memory.estimate(exp, abstract_state=state)
    assert estimate["activations"] > estimate["params"]  # the size is one where activations count
    assert abs(estimate["total"] / measured - 1) < 0.15, (estimate, measured)


def test_stored_activations_order_the_remat_policies():
    config = small_config()
    per_policy = {}
    for policy in ("none", "dots", "full"):
        config.model.update(scan_layers=True, remat_policy=policy)
        per_policy[policy] = memory.estimate(get_experiment(config, jax.devices()[:1]))["activations"]
    assert per_policy["full"] < per_policy["dots"] < per_policy["none"]


def test_summary_is_one_line_with_the_parts_and_the_flops():
    exp = get_experiment(small_config(), jax.devices()[:1])
    line = memory.summary(exp)
    assert "\n" not in line
    for part in ("memory per device", "params", "EMA", "optimizer", "gradients", "activations",
                 "remat 'none'", "FLOP per example"):
        assert part in line, part


def test_other_models_get_their_state_estimated_and_no_activation_model():
    exp = get_experiment(vae_moving_shapes.get_config("runlocal"), jax.devices()[:1])
    estimate = memory.estimate(exp)
    assert estimate["activations"] is None and estimate["params"] > 0
    assert "activations not modelled" in memory.summary(exp)
