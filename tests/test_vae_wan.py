"""The flax Wan 2.1 VAE against diffusers' `AutoencoderKLWan`, on a small random model saved and loaded
in diffusers' layout; chunked (cached) runs against whole clips; the loader's errors."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from safetensors.numpy import load_file, save_file  # noqa: E402
from safetensors.torch import save_file as save_torch_file  # noqa: E402

from sora_jax.models.vae_wan import WanVAE, load_wan_vae  # noqa: E402

# Wan 2.1's layout, narrower and a level shorter: 2 downsamplings (4x spatial), the second also in
# time (2x). diffusers encodes the first frame, then 4 frames at a time, so clips have 1 + 4k frames.
Z = 4
CONFIG = dict(base_dim=8, z_dim=Z, dim_mult=[1, 2, 2], num_res_blocks=1, attn_scales=[],
              temperal_downsample=[False, True],
              latents_mean=[0.3, -0.2, 0.1, 0.5], latents_std=[1.5, 0.8, 2.0, 1.2])
FRAMES, SIZE = 17, 16   # -> 9 latent frames of 4 x 4


@pytest.fixture(scope="module")
def torch_model():
    torch.manual_seed(0)
    model = diffusers.AutoencoderKLWan(**CONFIG).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):   # ones by default: randomised so that they are tested
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def folder(torch_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("wan_vae")
    torch_model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def loaded(folder):
    return load_wan_vae(folder)


@pytest.fixture(scope="module")
def video():
    return np.random.default_rng(0).uniform(-1, 1, (1, FRAMES, SIZE, SIZE, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def reference(torch_model, video):
    """diffusers' posterior mean of `video` and its decoding, channel-last."""
    with torch.no_grad():
        mean = torch_model.encode(torch.from_numpy(video).permute(0, 4, 1, 2, 3)).latent_dist.mean
        decoded = torch_model.decode(mean).sample
    return mean.permute(0, 2, 3, 4, 1).numpy(), decoded.permute(0, 2, 3, 4, 1).numpy()


@pytest.fixture(scope="module")
def encode(loaded):
    return jax.jit(loaded[0].encode)


@pytest.fixture(scope="module")
def decode(loaded):
    return jax.jit(loaded[0].decode)


def _normalised(mean):
    return (mean - np.array(CONFIG["latents_mean"])) / np.array(CONFIG["latents_std"])


def test_compression_and_latent_shape():
    vae = WanVAE(CONFIG)
    assert (vae.temporal_compression, vae.spatial_compression, vae.latent_channels) == (2, 4, Z)
    assert vae.latent_shape(FRAMES, SIZE, 32) == (9, 4, 8, Z)
    with pytest.raises(ValueError, match=r"1 \+ k \* 2 frames \(1, 3, 5"):
        vae.latent_shape(4, SIZE, SIZE)


def test_encode_matches_diffusers(loaded, encode, video, reference):
    vae, params = loaded
    latent = np.asarray(encode(params, jnp.asarray(video)))
    assert latent.shape == (1,) + vae.latent_shape(FRAMES, SIZE, SIZE)
    np.testing.assert_allclose(latent, _normalised(reference[0]), rtol=1e-4, atol=1e-5)


def test_decode_matches_diffusers(loaded, decode, reference):
    _, params = loaded
    mean, expected = reference
    # The random decoder's pixels are mostly inside (-1, 1), so diffusers' final clip hides little.
    assert 0.05 < np.mean(np.abs(expected)) and np.mean(np.abs(expected) == 1.0) < 0.01
    out = np.asarray(decode(params, jnp.asarray(_normalised(mean), jnp.float32)))
    assert out.shape == (1, FRAMES, SIZE, SIZE, 3)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_chunked_equals_whole_clip(loaded, encode, decode, video):
    """Chunks of 3 latent frames: 5 + 6 + 6 frames to encode, 3 + 3 + 3 latent frames to decode."""
    vae, params = loaded
    latent = encode(params, jnp.asarray(video))
    chunked = vae.encode_chunked(params, jnp.asarray(video), chunk_latent_frames=3)
    np.testing.assert_allclose(chunked, latent, rtol=1e-5, atol=1e-5)
    chunked = vae.decode_chunked(params, latent, chunk_latent_frames=3, to_host=True)
    np.testing.assert_allclose(chunked, decode(params, latent), rtol=1e-5, atol=1e-5)


def test_image_round_trip_shape(loaded):
    vae, params = loaded
    image = jax.ShapeDtypeStruct((2, 1, SIZE, 3 * SIZE, 3), jnp.float32)
    latent = jax.eval_shape(vae.encode, params, image)
    assert latent.shape == (2, *vae.latent_shape(1, SIZE, 3 * SIZE)) == (2, 1, 4, 12, Z)
    assert jax.eval_shape(vae.decode, params, latent).shape == image.shape


def test_sharded_checkpoint_loads_the_same(torch_model, loaded, tmp_path):
    torch_model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").is_file()
    _, params = load_wan_vae(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, params, loaded[1])


def test_missing_files_are_named(folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load_wan_vae(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load_wan_vae(tmp_path)
    shutil.copy(folder / "config.json", tmp_path)
    with pytest.raises(FileNotFoundError, match="neither diffusion_pytorch_model.safetensors"):
        load_wan_vae(tmp_path)


def test_bad_tensors_are_named(folder, tmp_path):
    shutil.copy(folder / "config.json", tmp_path)
    tensors = load_file(folder / "diffusion_pytorch_model.safetensors")
    tensors["decoder.conv_in.weight"] = np.zeros((16, Z, 3, 3, 2), np.float32)
    del tensors["encoder.norm_out.gamma"]
    save_file(tensors, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError) as error:
        load_wan_vae(tmp_path)
    message = str(error.value)
    assert "Missing tensors: encoder.norm_out.gamma" in message
    assert ("decoder.conv_in.weight in diffusion_pytorch_model.safetensors has shape (16, 4, 3, 3, 2) "
            "(expected (16, 4, 3, 3, 3))") in message


def test_bfloat16_checkpoint(folder, loaded, tmp_path):
    tensors = {name: torch.from_numpy(array).to(torch.bfloat16)
               for name, array in load_file(folder / "diffusion_pytorch_model.safetensors").items()}
    save_torch_file(tensors, tmp_path / "diffusion_pytorch_model.safetensors")
    shutil.copy(folder / "config.json", tmp_path)
    _, params = load_wan_vae(tmp_path)
    expected = jax.tree.map(lambda p: np.asarray(p).astype(jnp.bfloat16).astype(np.float32), loaded[1])
    jax.tree.map(np.testing.assert_array_equal, params, expected)


def test_config_errors():
    with pytest.raises(ValueError, match="lacks"):
        WanVAE({k: v for k, v in CONFIG.items() if k != "z_dim"})
    with pytest.raises(ValueError, match="Wan 2.2"):
        WanVAE({**CONFIG, "is_residual": True})
    with pytest.raises(ValueError, match="attn_scales"):
        WanVAE({**CONFIG, "attn_scales": [0.5]})
