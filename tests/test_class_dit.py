"""The DiT paper's class-conditional model (models/class_dit.py): its sizes and costs as the paper
prints them, equality with diffusers' DiTTransformer2DModel, and its experiment (configs/dit_imagenet.py)
built on an 8-device mesh."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax.models import class_dit
from sora_jax.models.class_dit import ClassDiT, model_size

# Table 4 of the paper: forward Gflops of each model on 32x32x4 latents.
PAPER_GFLOPS = {"S/8": 0.36, "S/4": 1.41, "S/2": 6.06, "B/8": 1.42, "B/4": 5.56, "B/2": 23.01,
                "L/8": 5.65, "L/4": 19.70, "L/2": 80.71, "XL/8": 7.39, "XL/4": 29.05, "XL/2": 118.64}
# Table 1: parameters (millions, rounded) per size.
PAPER_PARAMS = {"S": 33, "B": 130, "L": 458, "XL": 675}


def paper_model(name, **kw):
    return ClassDiT(in_channels=4, **model_size(name), **kw)


def tiny(**kw):
    sizes = dict(patch_size=2, in_channels=4, width=32, depth=2, num_heads=4, num_classes=10)
    return ClassDiT(**{**sizes, **kw})


@pytest.mark.parametrize("size", PAPER_PARAMS)
def test_parameter_counts_are_table_1s(size):
    """Counted abstractly (jax.eval_shape: nothing allocated), with the null class, for patch 2 (the
    figures hold for patch 4 too; patch 8's larger embedding layers round B, L and XL one million up)."""
    count = paper_model(f"{size}/2").param_count(32)
    assert round(count / 1e6) == PAPER_PARAMS[size], count


def test_gflops_are_table_4s_to_its_printed_precision():
    """Multiply-adds of the matmuls plus one per LayerNorm element (ClassDiT.paper_gflops). Two printed
    figures no consistent count gives: B/4 (5.5664 counted, 5.56 printed) and L/8 (5.65 printed,
    off the /8 : /4 ratio of ~3.93 every other size has; 5.01 counted)."""
    counted = {name: paper_model(name).paper_gflops(32) for name in PAPER_GFLOPS}
    exceptions = {"B/4": 5.57, "L/8": 5.01}
    for name, printed in PAPER_GFLOPS.items():
        assert round(counted[name], 2) == exceptions.get(name, printed), (name, counted[name])
    for size in ("S", "B", "XL"):
        assert PAPER_GFLOPS[f"{size}/4"] / PAPER_GFLOPS[f"{size}/8"] == pytest.approx(3.92, abs=0.02)
    assert PAPER_GFLOPS["L/4"] / PAPER_GFLOPS["L/8"] == pytest.approx(3.49, abs=0.01)
    assert counted["L/4"] / counted["L/8"] == pytest.approx(3.93, abs=0.01)
    # The project's MFU convention: 2 FLOPs per multiply-add, LayerNorms not counted.
    assert paper_model("XL/2").flops_per_example(32) / 2e9 == pytest.approx(118.62, abs=0.005)


def test_sincos_positions_are_dits():
    """DiT's (MAE's) layout: the first half of the channels encodes the column, the second the row,
    each [sin, cos] of frequencies 10000^(-k / (width / 4))."""
    pos = class_dit.sincos_positions(8, 3, 5)
    row, col = 2, 4
    omega = 1.0 / 10000 ** (np.arange(2) / 2)
    expected = np.concatenate([np.sin(col * omega), np.cos(col * omega), np.sin(row * omega),
                               np.cos(row * omega)])
    np.testing.assert_allclose(pos[row * 5 + col], expected, rtol=1e-6)


def test_new_model_predicts_zero_and_drop_labels_selects_the_null_class():
    model = tiny()
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    t, y = jnp.array([3, 900]), jnp.array([1, 9])

    @jax.jit
    def outputs(rng):
        params = model.init(rng, x, t, y)["params"]
        new = model.apply({"params": params}, x, t, y)
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(rng, len(leaves))
        params = tree.unflatten([p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
        apply = lambda labels, drop=None: model.apply({"params": params}, x, t, labels, drop)
        # The null class is the table's row num_classes.
        return new, apply(y, jnp.array([True, False])), apply(jnp.array([10, 9])), apply(y)

    new, dropped, null, conditional = outputs(jax.random.key(1))
    assert new.shape == (2, 8, 8, 8) and not np.any(np.asarray(new))  # adaLN-Zero: zero-initialised
    np.testing.assert_allclose(dropped, null, atol=1e-6)
    assert not np.allclose(dropped[0], conditional[0], atol=1e-3)
    np.testing.assert_allclose(dropped[1], conditional[1], atol=1e-6)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="unknown DiT model 'XL/3'"):
        model_size("XL/3")
    labels = jax.ShapeDtypeStruct((1,), jnp.int32)
    init = lambda model, shape, *drop: jax.eval_shape(model.init, jax.random.key(0),
                                                      jax.ShapeDtypeStruct(shape, jnp.float32),
                                                      labels, labels, *drop)
    with pytest.raises(ValueError, match="in_channels=4"):
        init(tiny(), (1, 8, 8, 3))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        init(tiny(), (1, 7, 7, 4))
    with pytest.raises(ValueError, match="null class"):
        init(tiny(null_class=False), (1, 8, 8, 4), jax.ShapeDtypeStruct((1,), bool))


def random_diffusers_dit(share_embedders=True):
    """A small diffusers DiT with every weight random, the zero-initialised gates and output layer
    too, and (as in checkpoints converted from DiT) block 0's timestep/label embedder in every block."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.DiTTransformer2DModel(
        num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero").eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
        if share_embedders:
            state = ref.state_dict()
            for name, tensor in state.items():
                if ".norm1.emb." in name:
                    tensor.copy_(state["transformer_blocks.0." + name.split(".", 2)[2]])
    return torch, ref


def test_ported_diffusers_dit_computes_the_same_function():
    torch, ref = random_diffusers_dit()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 4, 8, 8)).astype(np.float32)
    t, y = np.array([0, 517, 999]), np.array([1, 999, 1000])  # 1000: the null class
    with torch.no_grad():
        expected = ref(torch.from_numpy(x), timestep=torch.from_numpy(t),
                       class_labels=torch.from_numpy(y)).sample.numpy()
    model, params = class_dit.from_diffusers(ref.state_dict(), ref.config)
    assert (model.frequency_shift, model.mlp_norm_eps, model.learn_sigma) == (1, 1e-5, True)
    ours = jax.jit(model.apply)({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t),
                                jnp.asarray(y))
    # f32 throughout; PyTorch rounds one timestep frequency an ulp differently (~6e-5 in the
    # embedding at t = 999), so the bound is relative to the outputs' scale (~4).
    np.testing.assert_allclose(np.asarray(ours).transpose(0, 3, 1, 2), expected,
                               atol=1e-5 * np.abs(expected).max())


def test_port_refuses_blocks_with_their_own_embedders():
    _, ref = random_diffusers_dit(share_embedders=False)
    with pytest.raises(ValueError, match="differs from block 0's"):
        class_dit.from_diffusers(ref.state_dict(), ref.config)


def test_full_size_config_inits_and_steps_abstractly_on_8_devices():
    """DiT-XL/2 as configs/dit_imagenet.py builds it: init and one training step traced with the
    config's shardings (fsdp over the 8 emulated devices), nothing allocated."""
    from sora_jax.training.class_experiment import ClassExperiment
    config = importlib.import_module("configs.dit_imagenet").get_config()
    exp = ClassExperiment(config)
    assert dict(exp.mesh.shape)["fsdp"] == 8
    state = exp.abstract_state()
    shapes = exp.batch_shapes()
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)
             for (k, v), s in zip(shapes.items(), exp.batch_shardings(shapes).values())}
    with exp.activate():
        new_state, metrics = jax.eval_shape(exp.jit_train_step(donate=False), state, batch,
                                            jax.random.key(0))
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    assert metrics["loss"].shape == ()
    params = state.groups["dit"].params
    assert round(sum(p.size for p in jax.tree.leaves(params)) / 1e6) == 675
    qkv = params["blocks"]["attn"]["qkv"]["kernel"]
    assert qkv.shape == (28, 1152, 3, 16, 72) and qkv.sharding.spec[1] == "fsdp"


def test_runlocal_config_trains_real_steps_and_samples():
    """Two real steps of the runlocal model on one device (random clips for the data), then DDIM
    with guidance: finite loss and images of the right shape."""
    from sora_jax.training.class_experiment import ClassExperiment
    config = importlib.import_module("configs.dit_imagenet").get_config("runlocal")
    exp = ClassExperiment(config, devices=jax.devices()[:1])
    state = exp.init_state(jax.random.key(0))
    step = exp.jit_train_step()
    rng = np.random.default_rng(0)
    host = {"video": rng.uniform(-1, 1, (8, 5, 16, 16, 3)).astype(np.float32),
            "shape": rng.integers(0, 3, 8).astype(np.int32)}
    with exp.activate():
        for _ in range(2):
            state, metrics = step(state, exp.make_batch(host), jax.random.key(1))
    assert int(state.step) == 2 and np.isfinite(float(metrics["loss"]))
    sampler = exp.make_sampler(steps=2, guidance=1.5)
    images = sampler(state.groups["dit"].inference_params, [0, 2], jax.random.key(2))
    assert images.shape == (2, 16, 16, 3) and np.isfinite(np.asarray(images)).all()
