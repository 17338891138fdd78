"""Every config builds with its intended mesh (abstractly, at full size) and runs for real locally."""

import glob
import importlib
import os

import jax
import numpy as np
import pytest

from sora_jax.training import loop
from sora_jax.training.experiment import get_experiment, validate
from tests.helpers import one_device, tiny_data_dir, tiny_vae_workdir

CONFIGS = sorted(os.path.splitext(os.path.basename(p))[0]
                 for p in glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.py"))
                 if not p.endswith("__init__.py"))


def get_config(name, arg=None):
    return importlib.import_module(f"configs.{name}").get_config(arg)


def test_there_are_configs():
    assert {"moving_shapes", "moving_shapes_pod", "vae_moving_shapes"} <= set(CONFIGS)


def abstract_train_step(config):
    """(experiment, state, new state, metrics) of `config` on the 8 emulated devices: `jax.eval_shape`
    of init and of one train step under the mesh's shardings, with no array allocated."""
    exp = get_experiment(config)
    state = exp.abstract_state()
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s) for (k, v), s in
             zip(exp.batch_shapes().items(), exp.batch_shardings(exp.batch_shapes()).values())}
    step = exp.jit_train_step(donate=False)
    with exp.activate():
        new_state, metrics = jax.eval_shape(step, state, batch, jax.random.key(0))
    return exp, state, new_state, metrics


@pytest.mark.parametrize("name", CONFIGS)
def test_full_size_config_inits_and_steps_abstractly_on_its_mesh(name):
    _, state, new_state, metrics = abstract_train_step(get_config(name))
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    assert metrics["loss"].shape == ()
    params = sum(x.size for g in state.groups.values() for x in jax.tree.leaves(g.params))
    assert params > 1e5


@pytest.mark.parametrize("name", CONFIGS)
def test_runlocal_variant_trains_a_few_real_steps(name, tmp_path):
    config = get_config(name, "runlocal")
    config.data.data_dir = tiny_data_dir()
    if config.get("autoencoder") and config.autoencoder.get("workdir"):
        config.autoencoder.workdir = tiny_vae_workdir()
    state = loop.train(config, str(tmp_path), devices=one_device())  # as on a laptop
    assert int(state.step) == config.train.num_steps
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state))
    assert os.listdir(tmp_path / "samples")


def test_f17_variant_has_windows_of_five_latent_frames():
    config = get_config("moving_shapes", "f17")
    exp, state, _, metrics = abstract_train_step(config)
    assert (config.data.builder_config, config.data.frames) == ("f17_s16", 17)
    assert exp.latent_shape[0] == 5  # a lone frame + 4 x 4 frames: 3 generated between two given
    assert config.train.masks.first_last == 0.15
    assert "end_latent" not in exp.batch_shapes()
    assert abs(sum(config.train.masks.values()) - 1.0) < 1e-9
    assert metrics["loss"].shape == ()
    config.train.masks.end_image = 0.1  # end images: the frame at which latent 3 ends, alone
    exp, _, _, metrics = abstract_train_step(config)
    assert exp.end_frame == 12 and metrics["loss"].shape == ()
    assert exp.batch_shapes()["end_latent"].shape[1:] == (1, *exp.latent_shape[1:])
    with pytest.raises(ValueError, match="'f17' goes alone"):
        get_config("moving_shapes", "f17,runlocal")


def test_end_image_masks_are_refused_where_clips_cannot_hold_an_end_image():
    config = get_config("moving_shapes", "runlocal")  # 5 frames: 2 latent frames
    config.train.masks.end_image = 0.1
    exp = get_experiment(config)  # sampling images or short clips is fine, training is not
    with pytest.raises(ValueError, match="masks.end_image needs clips of at least 3 latent frames"):
        exp.jit_train_step()
    config = get_config("moving_shapes_mixed")
    config.train.masks.end_image = 0.1
    with pytest.raises(ValueError, match="masks.end_image .* clips of one size"):
        validate(config)


@pytest.mark.parametrize("name", CONFIGS)
def test_unknown_config_argument_is_rejected(name):
    with pytest.raises(ValueError, match="Unknown config arguments"):
        get_config(name, "runlocla")
