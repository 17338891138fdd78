"""The Flax CogVideoX VAE against diffusers' `AutoencoderKLCogVideoX`, on a small random model.

The reference model is built in torch with every parameter random (group-norm scales and shifts
included), saved with `save_pretrained`, and read back with `load_cogvideox_vae`.
"""

import copy
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from sora_jax.models.vae_cogvideox import (
    INDEX_NAME, WEIGHTS_NAME, CogVideoXVAE, load_cogvideox_vae)

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

CONFIG = dict(
    block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4,
    temporal_compression_ratio=4, down_block_types=("CogVideoXDownBlock3D",) * 3,
    up_block_types=("CogVideoXUpBlock3D",) * 3, sample_height=32, sample_width=32,
    scaling_factor=0.7)
TOL = 1e-4


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(torch model, its save_pretrained folder)."""
    torch.manual_seed(0)
    model = diffusers.AutoencoderKLCogVideoX(**CONFIG).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.normal_(1.0, 0.3)
                module.bias.normal_(0.0, 0.3)
    folder = tmp_path_factory.mktemp("cogvideox") / "vae"
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def loaded(reference):
    return load_cogvideox_vae(reference[1])


def to_torch(x) -> "torch.Tensor":
    """[B, T, H, W, C] -> torch [B, C, T, H, W]."""
    return torch.from_numpy(np.array(x)).permute(0, 4, 1, 2, 3)


def to_ours(x: "torch.Tensor") -> jax.Array:
    return jnp.asarray(x.permute(0, 2, 3, 4, 1).numpy())


def diffusers_mean_and_decoding(model, video):
    with torch.no_grad():
        mean = model.encode(to_torch(video)).latent_dist.mean
        return to_ours(mean), to_ours(model.decode(mean).sample)


def random_video(frames, seed=0):
    return jax.random.uniform(jax.random.key(seed), (1, frames, 16, 16, 3), minval=-1, maxval=1)


def assert_close(ours, theirs):
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=0, atol=TOL)


def test_clip_matches_diffusers(reference, loaded):
    vae, params = loaded
    video = random_video(9)
    mean, decoding = diffusers_mean_and_decoding(reference[0], video)
    latent = jax.jit(vae.encode)(params, video)
    assert latent.shape == (1, *vae.latent_shape(9, 16, 16))
    assert_close(latent / vae.scaling_factor, mean)
    assert_close(jax.jit(vae.decode)(params, mean * vae.scaling_factor), decoding)


def test_image_matches_diffusers(reference, loaded):
    vae, params = loaded
    image = random_video(1, seed=1)
    mean, decoding = diffusers_mean_and_decoding(reference[0], image)
    assert_close(jax.jit(vae.encode_raw)(params, image), mean)
    assert_close(jax.jit(vae.decode_raw)(params, mean), decoding)


def test_chunked_matches_diffusers_frame_batches(reference, loaded):
    """17 frames: diffusers encodes frames 0-8 then 9-16, and decodes latent frames 0-2 then 3-4,
    with group-norm statistics per batch."""
    vae, params = loaded
    video = random_video(17, seed=2)
    mean, decoding = diffusers_mean_and_decoding(reference[0], video)
    assert_close(vae.encode_chunked(params, video), mean * vae.scaling_factor)
    assert_close(vae.decode_chunked(params, mean * vae.scaling_factor), decoding)
    assert decoding.shape[1] == vae.decoded_frames(5) == 17


def test_shapes_and_config_checks(loaded):
    vae, _ = loaded
    assert (vae.temporal_compression, vae.spatial_compression, vae.latent_channels) == (4, 4, 4)
    assert vae.latent_shape(1, 16, 16) == (1, 4, 4, 4)
    assert vae.latent_shape(49, 32, 48) == (13, 8, 12, 4)
    assert [vae.decoded_frames(t) for t in (1, 2, 3, 13)] == [1, 8, 9, 49]
    with pytest.raises(ValueError, match=r"1 \+ k \* 4 frames \(1, 5, 9"):
        vae.latent_shape(8, 16, 16)
    with pytest.raises(ValueError, match="use_quant_conv"):
        CogVideoXVAE({**CONFIG, "use_quant_conv": True})
    with pytest.raises(ValueError, match="temporal_compression_ratio=8"):
        CogVideoXVAE({**CONFIG, "temporal_compression_ratio": 8})


def test_sharded_and_bfloat16_checkpoints(reference, loaded, tmp_path):
    model, folder = reference
    _, params = loaded
    tensors = safetensors.numpy.load_file(folder / WEIGHTS_NAME)
    names = sorted(tensors)
    shards = {"part-1.safetensors": names[::2], "part-2.safetensors": names[1::2]}
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(folder / "config.json", sharded)
    for shard, keys in shards.items():
        safetensors.numpy.save_file({k: tensors[k] for k in keys}, sharded / shard)
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (sharded / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    jax.tree.map(np.testing.assert_array_equal, load_cogvideox_vae(sharded)[1], params)

    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    _, bf16 = load_cogvideox_vae(tmp_path / "bf16", dtype=jnp.bfloat16)
    rounded = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    jax.tree.map(np.testing.assert_array_equal, bf16, rounded)


def test_loader_errors_name_the_problem(reference, tmp_path):
    folder = reference[1]
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load_cogvideox_vae(tmp_path / "nowhere")
    only_config = tmp_path / "only_config"
    only_config.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load_cogvideox_vae(only_config)
    shutil.copy(folder / "config.json", only_config)
    with pytest.raises(FileNotFoundError, match=f"neither {WEIGHTS_NAME}"):
        load_cogvideox_vae(only_config)

    tensors = safetensors.numpy.load_file(folder / WEIGHTS_NAME)
    name = "decoder.up_blocks.1.resnets.0.conv1.conv.weight"
    wrong = {**tensors, name: tensors[name][:, :8]}
    safetensors.numpy.save_file(wrong, only_config / WEIGHTS_NAME)
    with pytest.raises(ValueError, match=rf"{name} in {WEIGHTS_NAME} has shape \(16, 8, 3, 3, 3\)"):
        load_cogvideox_vae(only_config)
    del wrong[name]
    safetensors.numpy.save_file(wrong, only_config / WEIGHTS_NAME)
    with pytest.raises(ValueError, match=f"Missing tensors: {name}"):
        load_cogvideox_vae(only_config)
