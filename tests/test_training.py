"""Sharded training on 8 emulated CPU devices: equivalence, sharding, checkpoints, resume, failures."""

import json
import os
import signal

import jax
import ml_collections
import numpy as np
import pytest

from sora_jax.training import loop, text_cache
from sora_jax.training.checkpoint import CheckpointMismatchError, Checkpointer
from sora_jax.training.experiment import Experiment, at_sample_size, guidance_settings
from tests.helpers import one_device, tiny_config


def random_batch(exp: Experiment, seed: int = 0) -> dict:
    shapes = exp.batch_shapes()
    keys = jax.random.split(jax.random.key(seed), 2)
    return {
        "latent": np.asarray(jax.random.uniform(keys[0], shapes["latent"].shape, minval=-1, maxval=1)),
        "text": np.asarray(jax.random.normal(keys[1], shapes["text"].shape)),
        "text_mask": np.arange(shapes["text_mask"].shape[1])[None, :] < np.array([[5], [9], [3], [12]] * 2),
    }


def run_step(exp: Experiment, state, batch, **kwargs):
    with exp.activate():
        return exp.jit_train_step(donate=False, **kwargs)(state, batch, jax.random.key(7))


@pytest.fixture(scope="module")
def single_and_sharded():
    single = Experiment(tiny_config(), devices=jax.devices()[:1])
    sharded = Experiment(tiny_config(data=2, fsdp=2, tensor=2))
    assert dict(sharded.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2, "sequence": 1}
    state = single.init_state(jax.random.key(0))
    return single, sharded, state


def test_sharded_train_step_matches_single_device_step(single_and_sharded):
    single, sharded, state = single_and_sharded
    batch = random_batch(single)
    sharded_state = jax.device_put(state, sharded.state_shardings)
    new_single, m_single = run_step(single, state, batch)
    new_sharded, m_sharded = run_step(sharded, sharded_state, batch)
    np.testing.assert_allclose(m_single["loss"], m_sharded["loss"], rtol=1e-5)
    np.testing.assert_allclose(m_single["grad_norm"], m_sharded["grad_norm"], rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6),
                 new_single.groups["dit"].params, new_sharded.groups["dit"].params)


def test_parameters_and_optimizer_state_are_really_sharded(single_and_sharded):
    _, sharded, state = single_and_sharded
    sharded_state = jax.device_put(state, sharded.state_shardings)
    leaves = jax.tree.leaves(sharded_state)
    total = sum(x.nbytes for x in leaves)
    per_device = sum(x.addressable_shards[0].data.nbytes for x in leaves)
    # fsdp x tensor = 4 ways for the big matrices; norms, biases and the step stay replicated.
    assert per_device < 0.4 * total, (per_device, total)
    qkv_like = [x for x in jax.tree.leaves(sharded_state.groups["dit"].params) if x.ndim >= 3]
    assert any(len({str(s.index) for s in x.addressable_shards}) >= 4 for x in qkv_like)


def test_checkpoint_from_one_mesh_restores_onto_one_device_and_onto_another_mesh(
        single_and_sharded, tmp_path):
    _, sharded, state = single_and_sharded
    sharded_state = jax.device_put(state, sharded.state_shardings)
    ckpt = Checkpointer(str(tmp_path), max_to_keep=1)
    ckpt.save(3, sharded_state)
    ckpt.wait()
    for exp in (Experiment(tiny_config(), devices=jax.devices()[:1]),
                Experiment(tiny_config(fsdp=-1))):
        restored = Checkpointer(str(tmp_path)).restore(3, exp.abstract_state())
        jax.tree.map(np.testing.assert_array_equal, restored, state)
        leaf = jax.tree.leaves(restored.groups["dit"].params)[0]
        assert leaf.sharding.mesh.shape == exp.mesh.shape


def losses(workdir) -> dict[int, float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def logged_every_step(**overrides):
    config = tiny_config()
    config.train.update({**dict(num_steps=6, log_every=1, eval_every=100, sample_every=100,
                                checkpoint_every=100), **overrides})
    return config


class SignalAfter:
    """Wraps the text encoder to act (SIGTERM to this process, or NaN text) at its n-th call."""

    def __init__(self, monkeypatch, calls: int, action: str):
        original, count = text_cache.CachedTextEncoder, [0]

        class Encoder(original):
            def __call__(self, captions):
                count[0] += 1
                text, mask = super().__call__(captions)
                if count[0] == calls:
                    if action == "sigterm":
                        os.kill(os.getpid(), signal.SIGTERM)
                    else:
                        text = np.full_like(text, np.nan)
                return text, mask

        monkeypatch.setattr(text_cache, "CachedTextEncoder", Encoder)


def test_sigterm_saves_and_rerunning_resumes_with_the_same_losses(tmp_path, monkeypatch):
    reference = losses_of_run(tmp_path / "uninterrupted")
    workdir = str(tmp_path / "preempted")
    with monkeypatch.context() as m:
        # Call 1 encodes the validation batch, call k + 1 the batch of step k.
        SignalAfter(m, calls=4, action="sigterm")
        state = loop.train(logged_every_step(), workdir, devices=one_device())
    assert int(state.step) == 3
    assert Checkpointer(os.path.join(workdir, "checkpoints")).latest_step() == 3
    loop.train(logged_every_step(), workdir, devices=one_device())
    resumed = losses(workdir)
    assert sorted(resumed) == list(range(1, 7))
    np.testing.assert_allclose([resumed[s] for s in range(1, 7)],
                               [reference[s] for s in range(1, 7)], rtol=1e-5)


def losses_of_run(workdir):
    loop.train(logged_every_step(), str(workdir), devices=one_device())
    return losses(workdir)


def test_nan_loss_stops_training_names_the_step_and_keeps_the_last_good_checkpoint(
        tmp_path, monkeypatch):
    workdir = str(tmp_path)
    SignalAfter(monkeypatch, calls=6, action="nan")  # the batch of step 5
    with pytest.raises(loop.TrainingDiverged, match="step 5") as error:
        loop.train(logged_every_step(checkpoint_every=2), workdir, devices=one_device())
    assert "last good checkpoint is step 4" in str(error.value)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    assert ckpt.latest_step() == 4
    exp = Experiment(logged_every_step())
    restored = ckpt.restore(4, exp.abstract_state())
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(restored))


def test_workdir_with_another_model_shape_is_refused_and_left_untouched(tmp_path):
    workdir = str(tmp_path)
    config = logged_every_step(num_steps=2)
    loop.train(config, workdir, devices=one_device())
    before = {p: os.path.getmtime(os.path.join(dp, p))
              for dp, _, files in os.walk(workdir) for p in files}
    wider = logged_every_step(num_steps=4)
    wider.model.width = 96
    with pytest.raises(CheckpointMismatchError, match="Use a new --workdir"):
        loop.train(wider, workdir, devices=one_device())
    after = {p: os.path.getmtime(os.path.join(dp, p))
             for dp, _, files in os.walk(workdir) for p in files}
    assert before == after


def test_config_sizes_that_differ_from_the_dataset_are_refused_before_training(tmp_path):
    config = tiny_config()
    config.data.frames = 9  # the tiny dataset holds 5-frame clips
    with pytest.raises(ValueError, match=r"holds clips of shape \(5, 16, 16, 3\)"):
        loop.train(config, str(tmp_path), devices=one_device())
    assert not os.path.exists(tmp_path / "checkpoints" / "0")


@pytest.mark.parametrize("change, message", [
    (lambda c: c.model.update(width=65), "not divisible by config.model.num_heads"),
    (lambda c: c.data.update(height=18), "18"),
    (lambda c: c.data.update(batch_size=6), "multiple of"),
    (lambda c: c.update(mesh=dict(data=-1, pipeline=2)), "Unknown mesh axes"),
    (lambda c: c.diffusion.update(prediction="score"), "prediction"),
    (lambda c: c.model.update(dtype="float16"), "config.model.dtype"),
    (lambda c: c.optim.update(grad_accum_steps=3), "grad_accum_steps"),
    (lambda c: c.train.update(masks=dict(none=1.0, frist_frame=1.0)),
     "config.train.masks: .*frist_frame"),
    (lambda c: c.sampling.update(guidance_rescale=1.5),
     r"config.sampling: Guidance rescale must be in \[0, 1\], got 1.5"),
    (lambda c: c.sampling.update(guidance_interval=(0.8, 0.2)),
     r"config.sampling: Guidance interval must be \(lo, hi\) with 0 <= lo < hi <= 1"),
])
def test_inconsistent_config_values_fail_at_start_naming_the_setting(change, message):
    config = tiny_config()
    change(config)
    with pytest.raises(ValueError, match=message):
        Experiment(config)


def test_guidance_settings_default_to_plain_cfg_for_configs_saved_before_they_existed():
    saved = ml_collections.ConfigDict({"steps": 8, "guidance": 2.0})  # an older workdir's config
    assert guidance_settings(saved, guidance_rescale=None, guidance_interval=[0.1, 0.9]) == dict(
        guidance=2.0, guidance_rescale=0.0, guidance_interval=[0.1, 0.9], pixel_guidance=0.0)


def test_gradient_accumulation_gives_the_one_batch_update(single_and_sharded):
    single, _, state = single_and_sharded
    batch = random_batch(single)
    s1, m1 = run_step(single, state, batch, caption_dropout=0.5, grad_accum_steps=1)
    s4, m4 = run_step(single, state, batch, caption_dropout=0.5, grad_accum_steps=4)
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-5)
    np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6),
                 s1.groups["dit"].params, s4.groups["dit"].params)


def test_sampling_at_larger_sizes_extrapolates_positions_or_interpolates_them_into_training():
    config = tiny_config()  # 5 x 16 x 16 pixels, (1, 4, 4) patches: a 5 x 4 x 4 grid
    same = Experiment(at_sample_size(config, rope="interpolate"))
    assert same.model.rope_scale == (1.0, 1.0, 1.0)  # the training size is never scaled
    wide = at_sample_size(config, frames=9, width=32)
    assert Experiment(wide).model.rope_scale == (1.0, 1.0, 1.0)  # extrapolation by default
    wide.sampling.rope = "interpolate"
    assert Experiment(wide).model.rope_scale == (5 / 9, 1.0, 0.5)
    assert wide.sampling.rope_reference == (5, 16, 16) and config.data.width == 16
    wide.sampling.rope = "stretch"
    with pytest.raises(ValueError, match="config.sampling.rope='stretch'"):
        Experiment(wide)
