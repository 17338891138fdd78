"""The causal video VAE: causality, shapes, chunked and tiled runs, losses and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax.models import discriminator as disc_lib
from sora_jax.models import vae as vae_lib
from sora_jax.training.vae_step import VAELoss, kl_per_value

SMALL = dict(widths=(8, 16, 16), num_groups=4, latent_channels=4, patch_size=2)


def make(temporal=4, spatial=4, seed=0, **kw):
    vae = vae_lib.CausalVAE(temporal_compression=temporal, spatial_compression=spatial,
                            **{**SMALL, **kw})
    net = vae.init_net(jax.random.key(seed))
    c = vae.latent_channels
    # Non-trivial latent statistics, so normalisation is exercised too.
    return vae, {"net": net, "shift": jnp.linspace(-0.2, 0.3, c), "scale": jnp.linspace(0.5, 2, c)}


def video(frames, size=16, batch=2, seed=1):
    return jax.random.uniform(jax.random.key(seed), (batch, frames, size, size, 3), minval=-1,
                              maxval=1)


@pytest.fixture(scope="module")
def vae_and_params():
    return make()


def test_changing_frame_k_leaves_every_earlier_latent_unchanged(vae_and_params):
    vae, params = vae_and_params
    x = video(9)
    z = vae.encode(params, x)
    for k in (1, 4, 5, 8):
        z_changed = vae.encode(params, x.at[:, k].set(0.5))
        first_affected = (k + 3) // 4  # latent j sees frames <= 4j
        np.testing.assert_array_equal(z_changed[:, :first_affected], z[:, :first_affected])
        assert np.abs(z_changed[:, first_affected] - z[:, first_affected]).max() > 1e-4


def test_an_image_is_a_one_frame_video_and_round_trips_to_one_frame(vae_and_params):
    vae, params = vae_and_params
    image = video(1)
    z = vae.encode(params, image)
    assert z.shape == (2, 1, 4, 4, 4)
    assert vae.decode(params, z).shape == image.shape
    # The first frame of a clip is encoded on its own: its latent equals the image's.
    clip = jnp.concatenate([image, video(4, seed=7)], axis=1)
    np.testing.assert_allclose(vae.encode(params, clip)[:, :1], z, atol=1e-5)


@pytest.mark.parametrize("temporal", [1, 2, 4])
@pytest.mark.parametrize("spatial", [4, 8, 16])
def test_latent_shapes_for_every_supported_compression(temporal, spatial):
    levels = 1 + max(int(np.log2(spatial // 2)), int(np.log2(temporal)))
    vae = vae_lib.CausalVAE(temporal_compression=temporal, spatial_compression=spatial,
                            widths=(8,) * levels, num_groups=4, latent_channels=6, patch_size=2)
    frames, size = 1 + 2 * temporal, 32
    x = jax.ShapeDtypeStruct((1, frames, size, size, 3), jnp.float32)
    params = jax.eval_shape(lambda: vae.init_net(jax.random.key(0)))
    stats = {"shift": jnp.zeros(6), "scale": jnp.ones(6)}
    z = jax.eval_shape(lambda p, v: vae.encode({"net": p, **stats}, v), params, x)
    assert z.shape == (1, 3, size // spatial, size // spatial, 6)
    assert z.shape[1:] == vae.latent_shape(frames, size, size)
    out = jax.eval_shape(lambda p, l: vae.decode({"net": p, **stats}, l), params, z)
    assert out.shape == x.shape


@pytest.mark.parametrize("chunk", [1, 2])
def test_chunked_encoding_and_decoding_equal_the_whole_clip(vae_and_params, chunk):
    vae, params = vae_and_params
    x = video(17)
    z = vae.encode(params, x)
    np.testing.assert_allclose(vae.encode_chunked(params, x, chunk_latent_frames=chunk), z,
                               atol=2e-5)
    whole = vae.decode(params, z)
    np.testing.assert_allclose(vae.decode_chunked(params, z, chunk_latent_frames=chunk), whole,
                               atol=2e-5)
    on_host = vae.decode_chunked(params, z, chunk_latent_frames=chunk, to_host=True)
    assert isinstance(on_host, np.ndarray)
    np.testing.assert_allclose(on_host, whole, atol=2e-5)


def test_tiled_decoding_is_close_to_whole_frame_decoding(vae_and_params):
    vae, params = vae_and_params
    # A spatially stationary latent: each tile's group-norm statistics match the whole frame's.
    # Tiles see their own norm statistics and zero padding at their borders, so they are close to,
    # not equal to, the whole frame.
    z = jax.random.normal(jax.random.key(3), (1, 2, 16, 16, 4))
    whole = vae.decode(params, z)
    tiled = vae.decode_tiled(params, z, tile=12, overlap=6)
    assert tiled.shape == whole.shape
    error = float(jnp.mean(jnp.abs(tiled - whole)))
    assert error < 0.25 * float(jnp.mean(jnp.abs(whole - whole.mean())))
    # Without overlap the seams are visible; blending is what makes tiles agree.
    hard = vae.decode_tiled(params, z, tile=8, overlap=0)
    assert float(jnp.mean(jnp.abs(hard - whole))) > error


def test_blending_tiles_of_an_identity_decoder_reproduces_the_input():
    z = jax.random.normal(jax.random.key(0), (1, 2, 13, 11, 3))
    out = vae_lib.blend_tiles(lambda t: t, z, tile=5, overlap=2, scale=1)
    np.testing.assert_allclose(out, z, atol=1e-6)


def test_kl_of_known_gaussians():
    zeros = jnp.zeros((2, 1, 2, 2, 4))
    np.testing.assert_allclose(vae_lib.kl_divergence(zeros, zeros), [0.0, 0.0], atol=1e-7)
    # KL(N(1, 1) || N(0, 1)) = 1/2 per element; N(0, e) adds (e - 1 - 1) / 2.
    np.testing.assert_allclose(vae_lib.kl_divergence(zeros + 1, zeros), [8.0, 8.0], rtol=1e-6)
    np.testing.assert_allclose(vae_lib.kl_divergence(zeros, zeros + 1), [16 * (np.e - 2) / 2] * 2,
                               rtol=1e-6)
    video_like = jnp.zeros((2, 5, 4, 4, 3))
    np.testing.assert_allclose(kl_per_value(zeros + 1, zeros, video_like), 8.0 / 240, rtol=1e-6)


def test_hinge_and_generator_losses_on_known_logits():
    real, fake = jnp.array([2.0, 0.5, -1.0]), jnp.array([-2.0, 0.0, 1.0])
    # relu(1 - real) = [0, .5, 2], relu(1 + fake) = [0, 1, 2]
    np.testing.assert_allclose(disc_lib.hinge_discriminator_loss(real, fake),
                               0.5 * (2.5 / 3 + 3.0 / 3), rtol=1e-6)
    np.testing.assert_allclose(disc_lib.hinge_discriminator_loss(real * 0 + 1, fake * 0 - 1), 0.0)
    np.testing.assert_allclose(disc_lib.generator_loss(fake), 1.0 / 3, rtol=1e-6)
    weight = disc_lib.adaptive_weight({"k": jnp.array([3.0, 4.0])}, {"k": jnp.array([0.0, 1.0])})
    np.testing.assert_allclose(weight, 5.0 / (1.0 + 1e-4), rtol=1e-6)


def test_discriminator_scores_patches_of_a_video():
    disc = disc_lib.PatchDiscriminator3D(widths=(8, 16), num_groups=4)
    x = video(9, size=16)
    logits, _ = jax.eval_shape(lambda: disc.init_with_output(jax.random.key(0), x))
    assert logits.shape == (2, 5, 4, 4)


def test_frame_counts_that_do_not_tile_are_refused_naming_the_valid_ones(vae_and_params):
    vae, params = vae_and_params
    with pytest.raises(ValueError, match=r"1 \+ k \* 4 frames \(1, 5, 9, 13, 17"):
        vae.encode(params, video(8))
    with pytest.raises(ValueError, match=r"1 \+ k \* 4"):
        vae.latent_shape(6, 16, 16)


def test_wrong_channel_counts_and_frame_sizes_are_refused(vae_and_params):
    vae, params = vae_and_params
    with pytest.raises(ValueError, match="3 channels"):
        vae.encode(params, jnp.zeros((1, 5, 16, 16, 4)))
    with pytest.raises(ValueError, match="multiple of the spatial compression 4"):
        vae.encode(params, jnp.zeros((1, 5, 18, 16, 3)))


@pytest.mark.parametrize("kwargs, message", [
    (dict(temporal_compression=3), "temporal_compression=3"),
    (dict(spatial_compression=2), "spatial_compression=2"),
    (dict(widths=(8, 8)), "need 3 widths"),
    (dict(patch_size=3), "patch_size=3"),
])
def test_unsupported_vae_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        vae_lib.CausalVAE(**{**SMALL, **kwargs})


def test_unknown_loss_settings_are_refused():
    with pytest.raises(ValueError, match="config.loss.pixel='l3'"):
        VAELoss(pixel="l3")
