"""Rectified flow objective and samplers on problems with known answers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax.diffusion.flow import RectifiedFlow, expand_time, resolution_shift, shift_time
from sora_jax.diffusion.sampling import (Guidance, euler_sample, guide, guided_velocity, pixel_guidance,
                                         time_grid)

SHAPE = (2, 3, 4, 4, 3)


def exact_denoiser(flow, target):
    """The ideal network when all data is the single point `target`: x_0 is known exactly."""
    def denoise(x, t, cond):
        t = expand_time(t, x)
        x0 = jnp.broadcast_to(target, x.shape)
        noise = (x - (1 - t) * x0) / t
        return {"clean": x0, "velocity": noise - x0, "noise": noise}[flow.prediction]
    return denoise


@pytest.mark.parametrize("prediction", ["velocity", "clean", "noise"])
def test_euler_sampler_recovers_point_mass_for_every_prediction_type(prediction):
    flow = RectifiedFlow(prediction=prediction, min_denominator=1e-6)
    target = jnp.linspace(-0.5, 0.5, np.prod(SHAPE)).reshape(SHAPE)
    noise = jax.random.normal(jax.random.key(0), SHAPE)
    sample = euler_sample(flow, exact_denoiser(flow, target), noise, steps=7)
    np.testing.assert_allclose(sample, target, atol=1e-5)


@pytest.mark.parametrize("prediction", ["velocity", "clean", "noise"])
def test_loss_is_zero_for_exact_prediction_and_positive_otherwise(prediction):
    flow = RectifiedFlow(prediction=prediction, min_denominator=1e-6)
    x0 = jax.random.normal(jax.random.key(1), SHAPE)
    noise = jax.random.normal(jax.random.key(2), SHAPE)
    t = jnp.full((2, 3), 0.4)
    exact = {"velocity": noise - x0, "clean": x0, "noise": noise}[prediction]
    np.testing.assert_allclose(flow.loss(exact, x0, noise, t), 0.0, atol=1e-10)
    assert np.all(flow.loss(exact + 0.1, x0, noise, t) > 1e-3)


def test_all_prediction_types_measure_error_in_velocity_space():
    x0 = jax.random.normal(jax.random.key(1), SHAPE)
    noise = jax.random.normal(jax.random.key(2), SHAPE)
    t = jnp.full((2, 3), 0.5)
    flows = {p: RectifiedFlow(prediction=p) for p in ("velocity", "clean", "noise")}
    # At t = 0.5 a clean-sample error e is a velocity error of -e / t = -2e.
    clean_error = flows["clean"].loss(x0 + 0.1, x0, noise, t)
    velocity_error = flows["velocity"].loss(noise - x0 - 0.2, x0, noise, t)
    np.testing.assert_allclose(clean_error, velocity_error, rtol=1e-5)


def test_given_frames_are_excluded_from_the_loss_and_kept_by_the_sampler():
    flow = RectifiedFlow(prediction="velocity")
    x0 = jax.random.normal(jax.random.key(1), SHAPE)
    noise = jax.random.normal(jax.random.key(2), SHAPE)
    t = jnp.full((2, 3), 0.5)
    generate = jnp.array([[False, True, True]] * 2)
    wrong_on_given = (noise - x0).at[:, 0].add(5.0)
    np.testing.assert_allclose(flow.loss(wrong_on_given, x0, noise, t, generate), 0.0, atol=1e-10)

    given = jnp.full(SHAPE, 0.7)

    def denoise(x, t, drop):  # a velocity that reveals the time each frame was given
        return expand_time(t, x) * jnp.ones_like(x)

    out = euler_sample(flow, denoise, noise, steps=3, given=given, given_mask=~generate)
    np.testing.assert_allclose(out[:, 0], 0.7)
    # Euler on dx/dt = t over the grid 1, 2/3, 1/3, 0: -(1/3) * (1 + 2/3 + 1/3) = -2/3.
    np.testing.assert_allclose(out[:, 1:], noise[:, 1:] - 2 / 3, atol=1e-6)


def test_pixel_guidance_pulls_the_decoded_sample_toward_given_pixels_where_weighted():
    flow = RectifiedFlow(prediction="velocity")
    noise = jax.random.normal(jax.random.key(2), SHAPE)
    pixels = jax.random.uniform(jax.random.key(3), SHAPE, minval=-1, maxval=1)
    weight = jnp.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    decode = lambda z: 2.0 * z  # a linear stand-in for the VAE decoder
    model = exact_denoiser(flow, jnp.zeros(SHAPE))  # knows only the point mass at 0
    # Each step moves x0 by scale * weight * 2 (2 x0 - pixels) * 2 / N (N values per frame); at
    # scale N / 4 that lands exactly on decode^-1(pixels), so the sampler integrates toward it.
    full = pixel_guidance(decode, pixels, weight, scale=np.prod(SHAPE[2:]) / 4)
    out = euler_sample(flow, model, noise, steps=5, correct=full)
    np.testing.assert_allclose(out[0, 2], pixels[0, 2] / 2, atol=1e-5)
    np.testing.assert_allclose(out[1, 0], pixels[1, 0] / 2, atol=1e-5)
    np.testing.assert_allclose(out[0, :2], 0.0, atol=1e-5)  # unweighted frames: the model's
    np.testing.assert_allclose(out[1, 1:], 0.0, atol=1e-5)
    weak = euler_sample(flow, model, noise, steps=5, correct=pixel_guidance(decode, pixels, weight, 1.0))
    error = lambda x: float(jnp.abs(2 * x[0, 2] - pixels[0, 2]).mean())
    assert error(out) < error(weak) < error(euler_sample(flow, model, noise, steps=5))


def test_logit_normal_times_lie_in_unit_interval_and_shift_moves_them_to_noise():
    flow = RectifiedFlow(timestep_sampling="logit_normal")
    t = flow.sample_time(jax.random.key(0), 10_000)
    assert 0.0 < float(t.min()) and float(t.max()) < 1.0
    assert abs(float(jnp.median(t)) - 0.5) < 0.02
    shifted = RectifiedFlow(shift=3.0).sample_time(jax.random.key(0), 10_000)
    assert float(jnp.median(shifted)) > 0.7
    np.testing.assert_allclose(shift_time(jnp.array([0.0, 1.0]), 3.0), [0.0, 1.0])
    assert resolution_shift(4 * 1024, 1024) == pytest.approx(2.0)


def test_time_grid_runs_from_noise_to_data():
    grid = time_grid(10, shift=2.0)
    assert grid.shape == (11,) and float(grid[0]) == 1.0 and float(grid[-1]) == 0.0
    assert bool(jnp.all(jnp.diff(grid) < 0))


def per_row(c, x):
    return c[:, None, None, None, None] * jnp.ones_like(x)


def test_classifier_free_guidance_extrapolates_from_unconditional_to_conditional():
    flow = RectifiedFlow(prediction="velocity")
    x = jnp.zeros(SHAPE)
    t = jnp.full((2, 3), 0.5)
    denoise = lambda x, t, c: per_row(c, x)  # the velocity is the conditioning value
    cond, uncond = jnp.ones(2), jnp.zeros(2)
    for scale in (1.0, 4.0, 0.0):
        np.testing.assert_allclose(
            guided_velocity(flow, denoise, x, t, cond, uncond, Guidance(scale)), scale)


def test_guidance_rescale_zero_is_plain_cfg_and_one_restores_the_conditional_std():
    v_cond = jax.random.normal(jax.random.key(1), SHAPE)
    v_uncond = 0.3 * jax.random.normal(jax.random.key(2), SHAPE)
    plain = v_uncond + 5.0 * (v_cond - v_uncond)
    np.testing.assert_array_equal(guide(v_cond, v_uncond, Guidance(5.0)), plain)

    full = guide(v_cond, v_uncond, Guidance(5.0, rescale=1.0))
    axes = (1, 2, 3, 4)
    np.testing.assert_allclose(jnp.std(full, axes), jnp.std(v_cond, axes), rtol=1e-5)
    ratio = full / plain  # the guided direction, rescaled per sample
    np.testing.assert_allclose(ratio, jnp.broadcast_to(ratio[:, :1, :1, :1, :1], SHAPE), rtol=1e-4)
    np.testing.assert_allclose(guide(v_cond, v_uncond, Guidance(5.0, rescale=0.25)),
                               0.25 * full + 0.75 * plain, rtol=1e-5, atol=1e-6)

    # Given frames (weight 0) do not count towards the std.
    weight = jnp.array([0.0, 1.0, 1.0])[None, :, None, None, None]
    wild = v_cond.at[:, 0].set(100.0)
    np.testing.assert_allclose(guide(wild, v_uncond, Guidance(5.0, 1.0), weight)[:, 1:],
                               guide(v_cond[:, 1:], v_uncond[:, 1:], Guidance(5.0, 1.0)),
                               rtol=1e-5)


def analytic_denoiser(flow, target):
    """A network whose clean estimate for condition c [B] is c * target + x / 2 (target:
    [T, H, W, C]); it depends on x, so every step leaves its mark on the sample."""
    def denoise(x, t, c):
        t = expand_time(t, x)
        x0 = per_row(c, x) * target + 0.5 * x
        noise = (x - (1 - t) * x0) / t
        return {"clean": x0, "velocity": noise - x0, "noise": noise}[flow.prediction]
    return denoise


def reference_euler(flow, denoise, noise, cond, uncond, steps, guidance):
    """The guided Euler sampler written out step by step from the formulas."""
    grid = np.asarray(time_grid(steps, flow.shift))
    lo, hi = guidance.interval
    x = noise
    for i in range(steps):
        t = jnp.full(noise.shape[:2], grid[i])
        v = flow.to_velocity(denoise(x, t, cond), x, t)
        if lo <= grid[i] <= hi:
            v_u = flow.to_velocity(denoise(x, t, uncond), x, t)
            guided = v_u + guidance.scale * (v - v_u)
            ratio = jnp.std(v, (1, 2, 3, 4), keepdims=True) / jnp.std(guided, (1, 2, 3, 4),
                                                                      keepdims=True)
            v = guidance.rescale * ratio * guided + (1 - guidance.rescale) * guided
        x = x + (grid[i + 1] - grid[i]) * v
    return x


@pytest.mark.parametrize("prediction", ["velocity", "clean"])
@pytest.mark.parametrize("guidance", [Guidance(3.0), Guidance(3.0, rescale=0.7),
                                      Guidance(3.0, rescale=1.0, interval=(0.25, 0.75)),
                                      Guidance(0.0, interval=(0.05, 0.55))],
                         ids=["plain", "rescale", "rescale_in_interval",
                              "unconditional_in_interval"])
def test_guided_sampler_matches_the_step_by_step_formulas(prediction, guidance):
    flow = RectifiedFlow(prediction=prediction, min_denominator=1e-6)
    target = jax.random.normal(jax.random.key(3), SHAPE[1:])
    noise = jax.random.normal(jax.random.key(0), SHAPE)
    cond, uncond = jnp.array([1.0, -0.5]), jnp.array([0.2, 0.3])
    denoise = analytic_denoiser(flow, target)
    sample = euler_sample(flow, denoise, noise, cond, uncond, steps=10, guidance=guidance)
    expected = reference_euler(flow, denoise, noise, cond, uncond, 10, guidance)
    np.testing.assert_allclose(sample, expected, rtol=1e-4, atol=1e-4)


def test_unconditional_branch_sees_each_rows_negative_caption_or_else_the_null_one():
    flow = RectifiedFlow(prediction="velocity")
    noise = jnp.zeros(SHAPE)

    def denoise(x, t, cond):  # velocity: the caption's value, or 10 for the null caption
        text, drop_text = cond
        return per_row(jnp.where(drop_text, 10.0, text), x)

    text, own = jnp.array([1.0, 2.0]), jnp.zeros(2, bool)
    sample = lambda uncond: euler_sample(flow, denoise, noise, (text, own), uncond, steps=2,
                                         guidance=Guidance(3.0))
    # The Euler steps span t = 1 -> 0, so the sample is noise - v for a constant v.
    negative = jnp.array([5.0, -3.0])
    np.testing.assert_allclose(sample((negative, own))[:, 0, 0, 0, 0],
                               -(negative + 3.0 * (text - negative)), rtol=1e-6)
    np.testing.assert_allclose(sample((text, ~own))[:, 0, 0, 0, 0],
                               -(10.0 + 3.0 * (text - 10.0)), rtol=1e-6)


@pytest.mark.parametrize("guidance, guided_steps, traced_batches", [
    (Guidance(1.0), 0, [2]), (Guidance(3.0), 10, [4]),
    (Guidance(3.0, interval=(0.25, 0.75)), 5, [2, 4])], ids=["unguided", "always", "interval"])
def test_unconditional_pass_runs_only_inside_the_guidance_interval(guidance, guided_steps,
                                                                    traced_batches):
    flow = RectifiedFlow(prediction="velocity")
    traced, batches = [], []

    def denoise(x, t, c):
        batch = x.shape[0]
        traced.append(batch)
        jax.debug.callback(lambda: batches.append(batch))
        return per_row(c, x)

    cond, uncond = jnp.array([1.0, 2.0]), jnp.array([0.0, -1.0])
    sampler = jax.jit(lambda n: euler_sample(flow, denoise, n, cond, uncond, steps=10,
                                             guidance=guidance))
    out = sampler(jnp.zeros(SHAPE))
    sampler(jnp.ones(SHAPE))
    jax.effects_barrier()
    # Each branch of the loop body is traced once for the whole run, and compiled once.
    assert sorted(traced) == traced_batches
    assert batches.count(4) == 2 * guided_steps and batches.count(2) == 2 * (10 - guided_steps)
    # Steps of dt = 0.1: the conditional velocity c outside the interval, guided inside.
    v = 0.1 * (10 - guided_steps) * cond + 0.1 * guided_steps * (uncond + 3.0 * (cond - uncond))
    np.testing.assert_allclose(out[:, 0, 0, 0, 0], -v, rtol=1e-5)


@pytest.mark.parametrize("settings, message", [
    (dict(scale=-1.0), r"scale must be >= 0, got -1.0"),
    (dict(rescale=1.5), r"rescale must be in \[0, 1\], got 1.5"),
    (dict(interval=(0.6, 0.4)), r"0 <= lo < hi <= 1, got \(0.6, 0.4\)"),
    (dict(interval=(-0.1, 0.5)), r"0 <= lo < hi <= 1, got \(-0.1, 0.5\)"),
    (dict(interval=0.5), r"interval must be \(lo, hi\)"),
])
def test_bad_guidance_settings_are_rejected_naming_value_and_valid_range(settings, message):
    with pytest.raises(ValueError, match=message):
        Guidance(**settings)


def test_guided_sampler_needs_an_unconditional_input_with_the_batch_size():
    flow = RectifiedFlow(prediction="velocity")
    denoise = lambda x, t, c: per_row(c, x)
    noise, cond = jnp.zeros(SHAPE), jnp.ones(2)
    with pytest.raises(ValueError, match="needs an unconditional input"):
        euler_sample(flow, denoise, noise, cond, steps=2, guidance=Guidance(2.0))
    with pytest.raises(ValueError, match="batch size 2"):
        euler_sample(flow, denoise, noise, cond, jnp.ones(3), steps=2, guidance=Guidance(2.0))


def test_sampler_compiles_once_for_any_number_of_steps():
    flow = RectifiedFlow(prediction="velocity")
    traces = []

    def denoise(x, t, drop):
        traces.append(1)
        return -x

    noise = jnp.ones(SHAPE)
    jax.jit(lambda n: euler_sample(flow, denoise, n, steps=50))(noise)
    assert len(traces) == 1  # the loop body is traced once, not unrolled per step


def test_bad_objective_settings_are_rejected():
    with pytest.raises(ValueError, match="prediction"):
        RectifiedFlow(prediction="score")
    with pytest.raises(ValueError, match="timestep_sampling"):
        RectifiedFlow(timestep_sampling="cosine")
    with pytest.raises(ValueError, match="shift"):
        RectifiedFlow(shift=0.0)
