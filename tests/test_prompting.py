"""Image and video prompting: given frames stay as given, windows are laid out and conditioned as
documented in sora_jax/prompting.py, and bad prompts are refused with a clear message."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import moving_shapes
from sora_jax import prompting
from sora_jax.diffusion.sampling import strength_start
from sora_jax.models import vae as vae_lib
from sora_jax.training.experiment import Experiment, at_sample_size
from tests.helpers import tiny_config

GUIDANCE = dict(guidance=2.0, guidance_rescale=0.0, guidance_interval=(0.0, 1.0))


def text_for(exp, batch):
    return exp.text_encoder.encode(["a red square slides left"] * batch)


@pytest.fixture(scope="module")
def pixel():
    """A pixel-space DiT (no VAE: c = 1) at its initialisation, 5-frame windows."""
    exp = Experiment(tiny_config(data=1), devices=jax.devices()[:1])
    params = exp.init_state(jax.random.key(0)).groups["dit"].params
    return prompting.Prompter(exp, params, steps=2, guidance=GUIDANCE)


@pytest.fixture(scope="module")
def latent():
    """A latent DiT over a random causal VAE (4x in time), 9-frame windows of 3 latent frames."""
    config = at_sample_size(moving_shapes.get_config("runlocal"), frames=9)
    config.mesh = dict(data=1, fsdp=1, tensor=1, sequence=1)
    exp = Experiment(config, devices=jax.devices()[:1])
    vae = vae_lib.CausalVAE(widths=(8, 16, 16), num_groups=4, latent_channels=4, patch_size=2)
    exp.__dict__["loaded_autoencoder"] = (vae, {"net": vae.init_net(jax.random.key(1)),
                                                "shift": jnp.zeros(4), "scale": jnp.ones(4)})
    params = exp.init_state(jax.random.key(0)).groups["dit"].params
    return prompting.Prompter(exp, params, steps=2, guidance=GUIDANCE)


def perturbed(params, scale=0.05):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(9), len(leaves))
    return jax.tree.unflatten(tree, [p + scale * jax.random.normal(k, p.shape, p.dtype)
                                     for p, k in zip(leaves, keys)])


def clip(frames, batch=2, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (batch, frames, 16, 16, 3)).astype(np.float32)


def test_animate_keeps_the_image_as_the_first_frame(pixel):
    text, mask = text_for(pixel.exp, 2)
    image = clip(1)[:, 0]
    out = pixel.animate(image, text, mask, jax.random.key(0))
    assert out.video.shape == (2, 5, 16, 16, 3)
    np.testing.assert_array_equal(out.video[:, 0], image)
    assert out.generated.tolist() == [False, True, True, True, True] and out.seams == [1]
    np.testing.assert_allclose(out.given[0][1], image[:, None], atol=1e-6)  # kept clean


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_extension_slides_windows_until_the_requested_length(pixel, direction):
    text, mask = text_for(pixel.exp, 2)
    video = clip(5)
    out = pixel.extend(video, text, mask, jax.random.key(0), frames=12, direction=direction,
                       context_frames=2)
    assert out.video.shape[1] == 12
    # Windows of 5 frames given 2 make 3 new frames each: 5 -> 8 -> 11 -> 14, cut to 12.
    assert len(out.given) == 3 and out.generated.sum() == 7
    if direction == "forward":
        np.testing.assert_array_equal(out.video[:, :5], video)
        assert out.seams == [5, 8, 11]
        assert not out.generated[:5].any() and out.generated[5:].all()
    else:
        np.testing.assert_array_equal(out.video[:, -5:], video)
        assert out.seams == [1, 4, 7]
        assert out.generated[:7].all() and not out.generated[7:].any()
    for given, decoded in out.given:  # given frames are kept clean in every window
        np.testing.assert_allclose(decoded, given, atol=1e-6)


def test_connect_and_loop_keep_both_clips_and_mark_their_seams(pixel):
    text, mask = text_for(pixel.exp, 2)
    a, b = clip(5, seed=1), clip(5, seed=2)
    out = pixel.connect(a, b, text, mask, jax.random.key(0))  # a window of 5: 3 generated
    assert out.video.shape[1] == 5 + 2 + 5 and out.seams == [5, 7]
    np.testing.assert_array_equal(out.video[:, :5], a)
    np.testing.assert_array_equal(out.video[:, 7:], b)
    assert out.generated.tolist() == [False] * 5 + [True] * 2 + [False] * 5
    longer = pixel.connect(a, b, text, mask, jax.random.key(0), frames=6)  # another window size
    assert longer.video.shape[1] == 16
    looped = pixel.loop(a, text, mask, jax.random.key(0))
    assert looped.video.shape[1] == 7 and looped.seams == [5, 7]  # the wrap is a seam
    np.testing.assert_array_equal(looped.video[:, :5], a)


def test_causal_prefix_and_suffix_latents_condition_the_window(latent):
    text, mask = text_for(latent.exp, 2)
    vae, params = latent.exp.loaded_autoencoder
    video = clip(9)
    np.testing.assert_allclose(latent.prefix_latents(video[:, -5:]),
                               vae.encode(params, video[:, -5:]), atol=1e-5)
    suffix = latent.suffix_latents(video[:, :5])
    assert suffix.shape == (2, 1, 4, 4, 4)  # the lone first frame's latent is dropped
    np.testing.assert_allclose(suffix, vae.encode(params, video[:, :5])[:, 1:], atol=1e-5)
    # The decoder is causal: a window's first frames are the decoding of its given prefix.
    prefix = latent.prefix_latents(video[:, -5:])
    window = latent.sample_window(text, mask, jax.random.key(0), prefix=video[:, -5:])
    assert window.shape == (2, 9, 16, 16, 3)
    np.testing.assert_allclose(window[:, :5], np.clip(vae.decode(params, prefix), -1, 1), atol=1e-4)
    with pytest.raises(ValueError, match=r"1 \+ 4k frames"):
        latent.prefix_latents(video[:, :4])
    with pytest.raises(ValueError, match="fills the whole window"):
        latent.extend(video, text, mask, jax.random.key(0), frames=20, context_frames=9)
    with pytest.raises(ValueError, match="fills the whole window"):
        latent.extend(video, text, mask, jax.random.key(0), frames=20, direction="backward",
                      context_frames=9)
    with pytest.raises(ValueError, match="transitions have 4g - 1 frames"):
        latent.connect(video, video, text, mask, jax.random.key(0), frames=8)


def test_pixel_guidance_targets_the_given_frames_where_they_fall_in_the_window(latent):
    text, mask = text_for(latent.exp, 2)
    first, head = clip(1, seed=2), clip(5, seed=3)
    calls = []
    record = lambda *args, **kwargs: calls.append(kwargs) or np.zeros((2, 13, 16, 16, 3))
    guided = prompting.Prompter(latent.exp, latent.params, steps=2,
                                guidance=dict(GUIDANCE, pixel_guidance=50.0))
    guided._samplers[4] = record  # a 4-latent window: prefix, 2 generated, suffix
    guided.sample_window(text, mask, jax.random.key(0), prefix=first, suffix=head, window=4)
    pixels, weight = calls[0]["pixels"], calls[0]["pixel_weight"]
    assert pixels.shape == (2, 13, 16, 16, 3)
    # The image is frame 0; the suffix's first frame is the last frame of the latent before it.
    assert weight.tolist() == [[1] + [0] * 7 + [1] * 5] * 2
    np.testing.assert_array_equal(pixels[:, 0], first[:, 0])
    np.testing.assert_array_equal(pixels[:, 8:], head)
    plain = prompting.Prompter(latent.exp, latent.params, steps=2, guidance=GUIDANCE)
    plain._samplers[4] = record
    plain.sample_window(text, mask, jax.random.key(0), prefix=first, suffix=head, window=4)
    assert "pixels" not in calls[1] and "given" in calls[1]  # off: no decoder gradient compiled
    with pytest.raises(ValueError, match="pixel_guidance must be >= 0"):
        prompting.Prompter(latent.exp, latent.params, steps=2,
                           guidance=dict(GUIDANCE, pixel_guidance=-1.0))


def test_connections_end_on_a_lone_encoded_end_image_after_end_image_training(latent):
    """With end_image masks the window's last latent is the next clip's first frame encoded alone,
    the frame at which the generated latents end; the c frames decoded after it are dropped."""
    text, mask = text_for(latent.exp, 2)
    vae, params = latent.exp.loaded_autoencoder
    a, b = clip(5, seed=2), clip(1, seed=3)  # an end image needs one frame of the next clip
    calls = []
    decoded = np.random.default_rng(4).uniform(-1, 1, (2, 13, 16, 16, 3)).astype(np.float32)
    ends = copy.copy(latent)
    ends.end_image, ends.pixel_guidance = True, 50.0
    ends._samplers = {4: lambda *args, **kwargs: calls.append(kwargs) or decoded}
    out = ends.connect(a, b, text, mask, jax.random.key(0), frames=7)  # 2 generated latents
    given, given_mask = calls[0]["given"], calls[0]["given_mask"]
    assert given_mask.tolist() == [[True, False, False, True]] * 2
    np.testing.assert_allclose(given[:, 3], vae.encode(params, b)[:, 0], atol=1e-5)
    np.testing.assert_allclose(given[:, 0], vae.encode(params, a[:, -1:])[:, 0], atol=1e-5)
    assert calls[0]["pixel_weight"].tolist() == [[1] + [0] * 7 + [1] + [0] * 4] * 2
    np.testing.assert_array_equal(calls[0]["pixels"][:, 8], b[:, 0])
    np.testing.assert_array_equal(out.video, np.concatenate([a, decoded[:, 1:8], b], axis=1))
    assert out.seams == [5, 12]
    np.testing.assert_array_equal(out.given[1][1], decoded[:, 8:9])  # where b's frame reappears
    with pytest.raises(ValueError, match="a suffix or an end image, not both"):
        ends.sample_window(text, mask, jax.random.key(0), suffix=clip(5), end=b[:, 0], window=4)


def test_pixel_guidance_leads_the_generated_frames_into_the_suffix(pixel):
    # Pixel space (c = 1): a suffix of 1 + 2 frames gives the window's last 2; its first frame
    # falls on the generated frame before them, which only pixel guidance sees.
    text, mask = text_for(pixel.exp, 2)
    params, head = perturbed(pixel.params), clip(3, seed=3)
    # A step of half the frame's 16 * 16 * 3 values halves x0's error at each step.
    guided = prompting.Prompter(pixel.exp, params, steps=2,
                                guidance=dict(GUIDANCE, pixel_guidance=16 * 16 * 3 / 2))
    unguided = copy.copy(pixel)  # its sampler, compiled once for the module
    unguided.params = params
    guided, plain = (p.sample_window(text, mask, jax.random.key(0), suffix=head)
                     for p in (guided, unguided))
    error = lambda w: np.abs(w[:, 2] - head[:, 0]).mean()
    np.testing.assert_array_equal(guided[:, 3:], head[:, 1:])  # given frames stay as given
    assert error(guided) < 0.6 * error(plain)


def test_editing_at_full_strength_is_sampling_from_the_same_noise(pixel):
    # Perturbed weights: at initialisation the DiT's output layer is zero and every sample equal.
    noisy = perturbed(pixel.params)
    prompter = prompting.Prompter(pixel.exp, noisy, steps=2, guidance=GUIDANCE)
    text, mask = text_for(pixel.exp, 2)
    video, other = clip(5), clip(5, seed=7)
    edit = lambda v, s: prompter.edit(v, text, mask, jax.random.key(3), strength=s).video
    plain = np.asarray(prompter.sampler(noisy, text, mask, jax.random.key(3)))
    np.testing.assert_allclose(edit(video, 1.0), plain, atol=1e-5)
    np.testing.assert_allclose(edit(other, 1.0), plain, atol=1e-5)  # nothing of the clip is left
    assert np.abs(edit(video, 0.5) - edit(other, 0.5)).mean() > 0.05  # the clip shows through
    assert [strength_start(10, s) for s in (1.0, 0.5, 0.01)] == [0, 5, 9]
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
        strength_start(10, 0.0)
    with pytest.raises(ValueError, match="sampling size's 5 frames"):
        prompter.edit(clip(9), text, mask, jax.random.key(3), strength=0.5)


@pytest.mark.parametrize("flags, message", [
    (dict(extend="forward"), "--extend needs the clip to extend"),
    (dict(strength=0.5), "--strength edits a video"),
    (dict(video="v.mp4"), "--video needs what to do with it"),
    (dict(image="i.png", video="v.mp4", extend="forward"), "cannot be combined"),
    (dict(video="v.mp4", extend="forward", strength=0.5), "--extend and --strength"),
    (dict(connect=["a.mp4", "b.mp4"], loop=True), "--loop closes"),
    (dict(connect=["a.mp4"]), "--connect takes two clips"),
])
def test_incompatible_prompt_flags_are_refused(flags, message):
    with pytest.raises(ValueError, match=message):
        prompting.choose_mode(**flags)


def test_modes_of_compatible_flags():
    assert prompting.choose_mode() is None
    assert prompting.choose_mode(image="i.png") == "animate"
    assert prompting.choose_mode(image="i.png", loop=True) == "loop"
    assert prompting.choose_mode(video="v.mp4", extend="backward") == "extend"
    assert prompting.choose_mode(video="v.mp4", strength=0.3) == "edit"
    assert prompting.choose_mode(connect=["a", "b"]) == "connect"


def test_images_are_scaled_to_cover_and_centre_cropped_and_bad_files_named(tmp_path):
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, 10:30] = 255  # a white band in the middle 20 columns
    Image.fromarray(wide).save(tmp_path / "wide.png")
    image = prompting.read_image(str(tmp_path / "wide.png"), 16, 16)
    assert image.shape == (16, 16, 3) and image.dtype == np.float32
    assert image.min() >= -1 and image.max() <= 1
    assert image[:, 4:12].mean() > 0.9  # the centre of the band fills the centre crop
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="Cannot read the image .*bad.png"):
        prompting.read_image(str(tmp_path / "bad.png"), 16, 16)
    with pytest.raises(ValueError, match="does not exist"):
        prompting.read_video(str(tmp_path / "missing.mp4"), 16, 16)


def test_seam_statistics_compare_seams_with_motion_inside_clips():
    from sora_jax.eval.prompting_eval import (frame_differences, joined_difference, psnr,
                                              seam_statistics)

    video = np.zeros((1, 6, 4, 4, 3), np.uint8)
    video[0, :, 0, 0] = np.array([0, 10, 20, 80, 90, 100])[:, None]  # a jump into frame 3
    steps = frame_differences(video[0])
    np.testing.assert_allclose(steps, np.array([10, 10, 60, 10, 10]) * 3 / 48)
    stats = seam_statistics(video, [3])
    assert stats["seam_ratio"] == pytest.approx(6.0)
    wrap = seam_statistics(video, [6])  # the loop's wrap: last frame back to the first
    assert wrap["seam_difference"] == pytest.approx(100 * 3 / 48)
    both = seam_statistics(video, [3, 6])
    np.testing.assert_allclose(both["seam_differences"], np.array([60, 100]) * 3 / 48)
    assert both["seam_difference"] == pytest.approx(80 * 3 / 48)
    assert joined_difference(video[:, -1], video[:, 0]) == pytest.approx(100 * 3 / 48)
    assert psnr(video, video) > 90 and psnr(np.zeros(4, np.uint8), np.full(4, 255, np.uint8)) == 0
