"""Rectified flow objective and samplers on problems with known answers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax.diffusion.flow import RectifiedFlow, expand_time, resolution_shift, shift_time
from sora_jax.diffusion.sampling import euler_sample, guided_velocity, time_grid

SHAPE = (2, 3, 4, 4, 3)


def exact_denoiser(flow, target):
    """The ideal network when all data is the single point `target`: x_0 is known exactly."""
    def denoise(x, t, drop_text):
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


def test_classifier_free_guidance_extrapolates_from_unconditional_to_conditional():
    flow = RectifiedFlow(prediction="velocity")
    x = jnp.zeros(SHAPE)
    t = jnp.full((2, 3), 0.5)

    def denoise(x, t, drop_text):  # conditional velocity 1, unconditional 0
        return jnp.where(drop_text[:, None, None, None, None], 0.0, 1.0) * jnp.ones_like(x)

    np.testing.assert_allclose(guided_velocity(flow, denoise, x, t, 1.0), 1.0)
    np.testing.assert_allclose(guided_velocity(flow, denoise, x, t, 4.0), 4.0)
    np.testing.assert_allclose(guided_velocity(flow, denoise, x, t, 0.0), 0.0)


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
