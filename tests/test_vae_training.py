"""VAE training through the shared loop, its checkpoints, evaluation, the latent cache, and the DiT
that generates in its latents."""

import json
import os
import signal

import jax
import numpy as np
import pytest

from configs import moving_shapes, moving_shapes_mixed
from sora_jax.cache_latents import cache_latents
from sora_jax.data import latent_cache, pipeline
from sora_jax.eval import reconstruction as metrics
from sora_jax.evaluate import evaluate
from sora_jax.training import loop
from sora_jax.training.experiment import Experiment, text_identity
from sora_jax.training.vae_experiment import VAEExperiment, load_vae
from tests.helpers import one_device, tiny_data_dir, tiny_vae_config, tiny_vae_workdir


def vae_config(arg="runlocal", **train):
    config = tiny_vae_config(arg)
    config.train.update(train)
    return config


def dit_config(vae_workdir, config_module=moving_shapes, **data):
    config = config_module.get_config("runlocal")
    config.data.data_dir = tiny_data_dir()
    config.autoencoder.workdir = vae_workdir
    config.data.update(data)
    return config


def params_of(state, group="vae"):
    return jax.device_get(state.groups[group].params)


@pytest.fixture(scope="module")
def vae_run():
    workdir = tiny_vae_workdir()
    # Finished: restores the final state.
    return workdir, loop.train(vae_config(), workdir, devices=one_device())


def test_vae_trains_in_the_shared_loop_with_metrics_samples_and_latent_stats(vae_run):
    workdir, state = vae_run
    assert int(state.step) == 4
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        keys = set().union(*(json.loads(line) for line in f))
    assert {"loss", "pixel_loss", "kl", "psnr", "frames_per_s", "val/psnr", "val/l1"} <= keys
    assert os.listdir(os.path.join(workdir, "samples"))
    vae, params = load_vae(workdir)
    assert params["shift"].shape == params["scale"].shape == (4,)
    assert np.all(np.asarray(params["scale"]) > 0)
    # The stored statistics normalise training latents to zero mean and unit variance.
    batch = next(iter(pipeline.make_loader(
        name="moving_shapes", builder_config="tiny", data_dir=tiny_data_dir(), split="train",
        batch_size=8, seed=0, shuffle=False, num_epochs=1)))
    z = np.asarray(vae.encode(params, batch["video"]))
    assert np.abs(z.reshape(-1, 4).mean(0)).max() < 0.5
    assert np.all(np.abs(z.reshape(-1, 4).std(0) - 1) < 0.5)


def test_preempted_vae_training_resumes_to_the_same_weights(vae_run, tmp_path, monkeypatch):
    _, uninterrupted = vae_run
    calls, make_batch = [0], VAEExperiment.make_batch

    def sigterm_at_step_2(self, host):
        calls[0] += 1  # calls 1-2: validation and statistics batches; call k + 2: step k
        if calls[0] == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return make_batch(self, host)

    with monkeypatch.context() as m:
        m.setattr(VAEExperiment, "make_batch", sigterm_at_step_2)
        preempted = loop.train(vae_config(), str(tmp_path), devices=one_device())
    assert int(preempted.step) == 2
    resumed = loop.train(vae_config(), str(tmp_path), devices=one_device())
    assert int(resumed.step) == 4
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 params_of(resumed), params_of(uninterrupted))


def test_adversarial_training_updates_the_discriminator_from_disc_start(tmp_path):
    config = vae_config("runlocal,adversarial", num_steps=3)  # disc_start = 2
    exp = VAEExperiment(config, devices=jax.devices()[:1])
    state = exp.init_state(jax.random.key(0))
    step = exp.jit_train_step(donate=False)
    batch = {"video": jax.random.uniform(jax.random.key(1), exp.batch_shapes()["video"].shape,
                                         minval=-1, maxval=1)}
    disc_before = params_of(state, "disc")
    with exp.activate():
        state, early = step(state, batch, jax.random.key(2))  # step 0: before disc_start
        for _ in range(2):
            state, late = step(state, batch, jax.random.key(2))
    assert float(early["adaptive_weight"]) == 0.0 and float(late["adaptive_weight"]) > 0.0
    assert np.isfinite(float(late["disc_loss"])) and np.isfinite(float(late["generator_loss"]))
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), params_of(state, "disc"),
                         disc_before)
    assert max(jax.tree.leaves(moved)) > 0


def test_temporal_consistency_compares_reconstructed_motion_with_the_clips():
    grey = lambda *levels: np.broadcast_to(
        (np.array(levels, np.float32) / 127.5 - 1)[None, :, None, None, None], (2, 3, 4, 4, 3))
    video = grey(100, 125, 150)  # steps of 25 grey levels
    same = metrics.temporal_consistency(video, video)
    assert same == pytest.approx({"step_ratio": 1.0, "splice_ratio": 1.0})
    # Flicker: 125, 100, 175 steps by 25 and 75 (ratio 2); a frame and its neighbour's
    # reconstruction differ by 0 and 50 one way, 0 and 50 the other (ratio 1).
    flicker = metrics.temporal_consistency(grey(125, 100, 175), video)
    assert flicker == pytest.approx({"step_ratio": 2.0, "splice_ratio": 1.0})
    # A tone 75 levels off moves as the clip does (ratio 1) but jumps at every splice: by 100 one
    # way, 50 the other (ratio 3).
    toned = metrics.temporal_consistency(grey(175, 200, 225), video)
    assert toned == pytest.approx({"step_ratio": 1.0, "splice_ratio": 3.0})
    with pytest.raises(ValueError, match="one shape"):
        metrics.temporal_consistency(video[:, :1], video[:, :1])


def test_evaluate_reports_reconstruction_psnr_ssim_and_compression(vae_run):
    workdir, _ = vae_run
    result = evaluate(workdir, num_videos=8)
    assert result["task"] == "vae" and result["num_videos"] == 8
    assert result["latent_shape"] == [2, 4, 4, 4]
    assert result["compression"] == 4 * 4 * 4 * 3 / 4
    assert result["compression_of_these_clips"] == pytest.approx(5 * 16 * 16 * 3 / (2 * 4 * 4 * 4))
    assert 0 < result["psnr"] < 100 and -1 <= result["ssim"] <= 1
    assert result["step_ratio"] > 0 and result["splice_ratio"] > 0
    assert any(f.endswith(".gif") for f in os.listdir(os.path.join(workdir, "eval")))


@pytest.fixture(scope="module")
def cache_dir(vae_run, tmp_path_factory):
    workdir, _ = vae_run
    out = str(tmp_path_factory.mktemp("cache") / "latents")
    cache_latents(dit_config(workdir), out=out)
    return out


def test_latent_cache_round_trips_latents_captions_and_text_embeddings(vae_run, cache_dir):
    workdir, _ = vae_run
    metadata = latent_cache.read_metadata(cache_dir)
    assert metadata["latent_shape"] == [2, 4, 4, 4] and metadata["text_embeddings"]
    cached = next(iter(pipeline.make_loader(
        name="moving_shapes", builder_config="tiny", data_dir=None, split="validation",
        batch_size=4, seed=0, shuffle=False, num_epochs=1, latent_cache=cache_dir)))
    pixels = next(iter(pipeline.make_loader(
        name="moving_shapes", builder_config="tiny", data_dir=tiny_data_dir(), split="validation",
        batch_size=4, seed=0, shuffle=False, num_epochs=1)))
    exp = Experiment(dit_config(workdir), devices=jax.devices()[:1])
    assert list(cached["caption"]) == list(pixels["caption"])
    np.testing.assert_array_equal(cached["colour"], pixels["colour"])
    np.testing.assert_allclose(cached["latent"], exp.encode_video(pixels["video"]), atol=1e-6)
    text, mask = exp.text_encoder.encode(list(pixels["caption"]))
    np.testing.assert_array_equal(cached["text_mask"], np.asarray(mask))
    np.testing.assert_allclose(cached["text"], np.asarray(text), atol=2e-3)  # stored as float16


def test_an_existing_cache_is_kept_and_never_overwritten(vae_run, cache_dir):
    before = os.path.getmtime(os.path.join(cache_dir, latent_cache.METADATA))
    assert cache_latents(dit_config(vae_run[0]), out=cache_dir) == cache_dir
    assert os.path.getmtime(os.path.join(cache_dir, latent_cache.METADATA)) == before
    with pytest.raises(FileExistsError, match="already exists"):
        latent_cache.write_cache(cache_dir, {}, encode_video=None, encode_text=None, metadata={})


def test_dit_trains_on_the_latent_cache_and_samples_through_the_vae(vae_run, cache_dir, tmp_path):
    config = dit_config(vae_run[0], latent_cache=cache_dir)
    state = loop.train(config, str(tmp_path), devices=one_device())
    assert int(state.step) == config.train.num_steps
    assert os.listdir(tmp_path / "samples")


def test_a_vae_whose_latents_differ_from_the_dit_config_is_refused(vae_run, cache_dir, tmp_path):
    config = dit_config(vae_run[0])
    config.autoencoder.latent_channels = 8
    with pytest.raises(ValueError, match="latent geometry"):
        loop.train(config, str(tmp_path / "a"), devices=one_device())
    config = dit_config(vae_run[0], latent_cache=cache_dir)
    config.data.frames, config.data.builder_config = 9, "f9_s16"
    with pytest.raises(ValueError, match=r"latent cache .* does not match"):
        latent_cache.check_matches(cache_dir, latent_shape=(3, 4, 4, 4),
                                   text=text_identity(config.text))
    config = dit_config(vae_run[0], latent_cache=cache_dir)
    config.text.max_length += 8
    with pytest.raises(ValueError, match=r"does not match this config: text embeddings"):
        loop.train(config, str(tmp_path / "a"), devices=one_device())
    assert not os.path.exists(tmp_path / "a" / "checkpoints" / "0")


def test_end_images_are_cached_for_end_image_masks_and_required_of_the_cache(tmp_path):
    """Each record keeps its clip's frame `end_frame` encoded alone (diffusion/masks.py 'end_image');
    a cache with other end images, or none, is refused for a config that needs them."""
    def encode(video):  # 1 + 4k frames -> 1 + k latent frames, each the mean of its frames
        first, rest = video[:, :1], video[:, 1:]
        groups = rest.reshape(rest.shape[0], -1, 4, *rest.shape[2:]).mean(axis=2)
        return np.concatenate([first, groups], axis=1)[:, :, ::4, ::4, :]

    videos = np.random.default_rng(0).uniform(-1, 1, (4, 9, 8, 8, 3)).astype(np.float32)
    batch = {"video": videos, "caption": np.array(["a red square"] * 4)}
    out = str(tmp_path / "ends")
    latent_cache.write_cache(out, {"train": [batch]}, encode_video=encode, encode_text=None,
                             metadata={}, end_frame=4)
    source = latent_cache.data_source(out, "train")
    records = [latent_cache.DecodeRecord().map(source[i]) for i in range(4)]
    np.testing.assert_allclose(np.stack([r["end_latent"] for r in records]),
                               encode(videos[:, 4:5]), atol=1e-6)
    np.testing.assert_allclose(np.stack([r["latent"] for r in records]), encode(videos), atol=1e-6)
    latent_cache.check_matches(out, latent_shape=(3, 2, 2, 3), text={}, end_frame=4)
    with pytest.raises(ValueError, match="end images of frame 4 vs .* need frame 8"):
        latent_cache.check_matches(out, latent_shape=(3, 2, 2, 3), text={}, end_frame=8)
    plain = str(tmp_path / "plain")
    latent_cache.write_cache(plain, {"train": [batch]}, encode_video=encode, encode_text=None,
                             metadata={})
    latent_cache.check_matches(plain, latent_shape=(3, 2, 2, 3), text={})
    with pytest.raises(ValueError, match="end images of frame None .* Rebuild it"):
        latent_cache.check_matches(plain, latent_shape=(3, 2, 2, 3), text={}, end_frame=4)


def mixed_config(vae_workdir, **data):
    return dit_config(vae_workdir, moving_shapes_mixed, **data)


def test_a_cache_of_clips_of_many_sizes_serves_the_batcher_what_pixels_would(vae_run, cache_dir,
                                                                           tmp_path):
    workdir, _ = vae_run
    out = str(tmp_path / "mixed")
    cache_latents(mixed_config(workdir), out=out, splits=["validation"])
    metadata = latent_cache.read_metadata(out)
    assert metadata["latent_shape"] is None and metadata["clip_sizes"]
    assert len(metadata["latent_sizes"]) > 2  # images, 5 and 9 frames; three aspects

    exp = Experiment(mixed_config(workdir), devices=jax.devices()[:1])
    read = lambda **kw: list(pipeline.make_loader(
        **pipeline.data_kwargs(mixed_config(workdir, **kw).data), split="validation",
        batch_size=16, seed=0, shuffle=False, num_epochs=1, collate="list"))
    from_cache = list(exp._clips(iter(read(latent_cache=out))))
    from_pixels = list(exp._clips(iter(read())))
    assert len(from_cache) == len(from_pixels) == 16
    assert len({c["latent"].shape for c in from_cache}) > 2

    def same(cached, encoded):  # the cache keeps clips grouped by size, not in the dataset's order
        return (all(cached[k] == encoded[k] for k in ("frames", "height", "width", "fps"))
                and cached["latent"].shape == encoded["latent"].shape
                and np.allclose(cached["latent"], encoded["latent"], atol=1e-5)
                and np.allclose(cached["text"], encoded["text"], atol=2e-3))  # text in float16

    for cached in from_cache:
        match = next(i for i, encoded in enumerate(from_pixels) if same(cached, encoded))
        from_pixels.pop(match)

    # Each config reads only a cache of its kind.
    latent_cache.check_matches(out, latent_shape=exp.cache_latent_shape(),
                               text=text_identity(exp.config.text))
    with pytest.raises(ValueError, match="clips of many sizes vs the config's latents"):
        latent_cache.check_matches(out, latent_shape=(2, 4, 4, 4),
                                   text=text_identity(exp.config.text))
    with pytest.raises(ValueError, match="without their sizes"):
        latent_cache.check_matches(cache_dir, latent_shape=exp.cache_latent_shape(),
                                   text=text_identity(exp.config.text))


def test_a_dit_workdir_pointed_at_a_non_vae_workdir_is_refused(tmp_path):
    config = dit_config(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        Experiment(config).loaded_autoencoder
