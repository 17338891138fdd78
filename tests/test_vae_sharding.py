"""The causal VAE with a clip split over the `sequence` mesh axis (parallel/vae_sharding.py), on 8
emulated devices: sharded encoding and decoding equal the unsharded VAE, and the compiled programs
split the work (each device needs a fraction of the activation memory; neighbours exchange halos).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax.models import vae as vae_lib
from sora_jax.parallel import vae_sharding
from sora_jax.parallel.mesh import make_mesh

# Two levels, 2x in time and 4x in space: 33 frames of 64x64 pixels -> 17 x 16 x 16 latents; over 4
# devices each holds 4 of the 16 latent frames after the first, or 4 latent rows. Large enough for
# activations, not the halos or the first frame, to dominate memory.
VAE = vae_lib.CausalVAE(widths=(4, 8), num_groups=2, patch_size=2, latent_channels=2,
                        temporal_compression=2, spatial_compression=4, mid_attention=False)
SHAPE = (2, 33, 64, 64, 3)
SPLIT = 4  # devices on the `sequence` axis; the batch goes over `data`'s 2


def _random_vae_params(vae, rng: np.random.Generator):
    """Random N(0, 1 / fan_in) weights from numpy: compiling the initialiser would cost more than
    the test."""
    net = jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, math.prod(s.shape[:-1]) ** -0.5,
                                                        s.shape), jnp.float32),
                       jax.eval_shape(vae.init_net, jax.random.key(0)))
    channels = vae.latent_channels
    return {"net": net, "shift": jnp.full((channels,), 0.1), "scale": jnp.full((channels,), 1.5)}


@pytest.fixture(scope="module")
def setup():
    mesh = make_mesh(dict(data=2, sequence=SPLIT))
    rng = np.random.default_rng(0)
    params = dict(_random_vae_params(VAE, rng), shift=jnp.array([0.1, -0.2]),
                  scale=jnp.array([1.5, 0.7]))
    video = jnp.asarray(rng.uniform(-1.0, 1.0, SHAPE), jnp.float32)
    encode = jax.jit(VAE.encode).lower(params, video).compile()
    latent = encode(params, video)
    decode = jax.jit(VAE.decode).lower(params, latent).compile()
    return dict(mesh=mesh, params=params, video=video, latent=latent,
                decoded=decode(params, latent), encode_temp=_temp_bytes(encode),
                decode_temp=_temp_bytes(decode))


def _temp_bytes(compiled) -> int:
    """Bytes of XLA's temporaries (the activations) of one device during a call."""
    return compiled.memory_analysis().temp_size_in_bytes


def _assert_close(actual, expected):
    expected = np.asarray(expected)
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=1e-5,
                               atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("over", ["frames", "height"])
def test_sharded_encode_equals_encode_with_the_work_split(setup, over):
    compiled = vae_sharding.sharded_encode.lower(
        VAE, setup["params"], setup["video"], setup["mesh"], over=over,
        batch_axes=("data",)).compile()
    latent = compiled(setup["params"], setup["video"])

    _assert_close(latent, setup["latent"])
    # An even split over data x sequence would hold 1/8 of the activations: allow twice that (halos,
    # the first frame). Splitting the batch alone would at best halve them.
    assert _temp_bytes(compiled) < setup["encode_temp"] / 4, (_temp_bytes(compiled),
                                                               setup["encode_temp"])
    hlo = compiled.as_text()
    assert "collective-permute" in hlo  # halos from neighbouring devices
    if over == "height":
        assert "all-gather" not in hlo
        assert latent.sharding.shard_shape(latent.shape) == (1, 17, 16 // SPLIT, 16, 2)


@pytest.mark.parametrize("over", ["frames", "height"])
def test_sharded_decode_equals_decode_with_the_work_split(setup, over):
    compiled = vae_sharding.sharded_decode.lower(
        VAE, setup["params"], setup["latent"], setup["mesh"], over=over,
        batch_axes=("data",)).compile()
    video = compiled(setup["params"], setup["latent"])

    _assert_close(video, setup["decoded"])
    assert _temp_bytes(compiled) < setup["decode_temp"] / 4, (_temp_bytes(compiled),
                                                              setup["decode_temp"])
    hlo = compiled.as_text()
    assert "collective-permute" in hlo
    if over == "height":
        assert "all-gather" not in hlo
        assert video.sharding.shard_shape(video.shape) == (1, 33, 64 // SPLIT, 64, 3)


def test_a_bf16_vae_split_over_frames_has_a_gradient(setup):
    """The split's gradient sums the first frame's cache over the devices: in f32, as XLA's CPU
    compiler fails on that all-reduce in bf16."""
    vae = dataclasses.replace(VAE, dtype="bfloat16")
    z = jnp.asarray(np.random.default_rng(2).normal(size=(2, 9, 4, 4, 2)), jnp.float32)
    energy = lambda decode: jax.jit(jax.grad(lambda z: jnp.sum(decode(z).astype(jnp.float32) ** 2)))
    split = energy(lambda z: vae_sharding.sharded_decode(vae, setup["params"], z, setup["mesh"]))(z)
    whole = energy(lambda z: vae.decode(setup["params"], z))(z)
    np.testing.assert_allclose(split, whole, atol=0.02 * np.abs(whole).max())


@pytest.mark.parametrize("frames, problem", [
    (9, "at least 2"),   # 5 latent frames: one per device after the first
    (11, "1 \\+ 4 \\* j latent frames"),  # 6 latent frames: 5 do not split 4 ways
])
def test_frames_that_do_not_split_evenly_are_refused(setup, frames, problem):
    video = jax.ShapeDtypeStruct((2, frames, 16, 16, 3), jnp.float32)
    with pytest.raises(ValueError, match=problem):
        jax.eval_shape(
            lambda v: vae_sharding.sharded_encode(VAE, setup["params"], v, setup["mesh"]), video)


def test_a_height_that_does_not_split_evenly_is_refused(setup):
    latent = jax.ShapeDtypeStruct((2, 17, 6, 16, 2), jnp.float32)  # 6 latent rows over 4 devices
    with pytest.raises(ValueError, match="latent height of 6 rows"):
        jax.eval_shape(lambda z: vae_sharding.sharded_decode(VAE, setup["params"], z, setup["mesh"],
                                                             over="height"), latent)


def test_a_batch_that_does_not_split_over_the_batch_axes_is_refused(setup):
    video = jax.ShapeDtypeStruct((1, 33, 16, 16, 3), jnp.float32)
    with pytest.raises(ValueError, match="batch of 1"):
        jax.eval_shape(lambda v: vae_sharding.sharded_encode(VAE, setup["params"], v, setup["mesh"],
                                                             batch_axes=("data",)), video)


# Wired into the experiment (config.autoencoder.shard_over) --------------------------------------


# The runlocal DiT's geometry (4x in time and space, 4 channels) with random weights.
DIT_VAE = vae_lib.CausalVAE(widths=(4, 8, 8), num_groups=2, patch_size=2, latent_channels=4,
                            temporal_compression=4, spatial_compression=4, mid_attention=False)


def _latent_experiment(shard_over, **mesh):
    """The default experiment's runlocal variant on 17-frame clips, with `DIT_VAE`."""
    from configs import moving_shapes
    from sora_jax.training.experiment import Experiment

    config = moving_shapes.get_config("runlocal")
    config.autoencoder.shard_over = shard_over
    config.data.frames = 17  # 5 latent frames: 4 after the first split 2 ways
    config.mesh = {**dict(data=-1, fsdp=1, tensor=1, sequence=1), **mesh}
    exp = Experiment(config)
    # Instead of a trained VAE:
    exp.loaded_autoencoder = (DIT_VAE, _random_vae_params(DIT_VAE, np.random.default_rng(0)))
    return exp


def test_experiment_encodes_and_samples_with_the_vae_split_over_frames():
    """Encoding, and the sampler's decoding (pixel guidance's decoder gradient included), with
    the VAE split over frames equal the whole VAE's."""
    whole, split = _latent_experiment(None), _latent_experiment("frames", sequence=2)
    assert (whole.vae_split, split.vae_split) == (None, "frames")
    video = np.random.default_rng(0).uniform(-1, 1, (8, 17, 16, 16, 3)).astype(np.float32)
    latent = whole.encode_video(video)
    _assert_close(split.encode_video(video), latent)
    params = jax.device_get(whole.init_state(jax.random.key(0)).groups["dit"].params)
    text, mask = jax.device_get(whole.text_encoder.encode(["a red square moves left"] * 8))
    given = dict(given=latent, given_mask=np.array([[True] + [False] * 4] * 8),
                 pixels=video, pixel_weight=np.ones((8, 17), np.float32))
    samples = [exp.make_sampler(steps=1, guidance=2.0, pixel_guidance=10.0)(
                   params, text, mask, jax.random.key(1), **given) for exp in (whole, split)]
    _assert_close(samples[1], samples[0])


def test_experiment_encodes_with_the_vae_split_over_height():
    whole, split = _latent_experiment(None), _latent_experiment("height", sequence=2)
    assert split.vae_split == "height"
    video = np.random.default_rng(0).uniform(-1, 1, (8, 5, 16, 16, 3)).astype(np.float32)
    _assert_close(split.encode_video(video), whole.encode_video(video))


def test_shard_over_is_checked():
    with pytest.raises(ValueError, match="shard_over='time'; valid: frames, height"):
        _latent_experiment("time", sequence=2)
    assert _latent_experiment("frames").vae_split is None  # a sequence axis of one device
    from sora_jax.training.experiment import Experiment
    from tests.helpers import tiny_config

    config = tiny_config()  # pixel space: the identity autoencoder
    config.autoencoder.shard_over = "frames"
    with pytest.raises(ValueError, match="splits the causal VAE .* not kind 'identity'"):
        Experiment(config)
