"""DDPM/DDIM (diffusion/ddpm.py): the schedule, forward process, hybrid loss and DDIM sampler, against
numpy re-derivations of the DDPM / Improved-DDPM formulas and against diffusers' schedulers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax.diffusion.ddpm import DDPM, ddim_timesteps, linear_betas

T = 1000


def reference_libraries():
    """(torch, diffusers), from the [interop] extra; tests that compare with them skip without."""
    return pytest.importorskip("torch"), pytest.importorskip("diffusers")


def reference_alphas_cumprod():
    """DDPM's linear schedule, from its definition: abar_t = prod_{s <= t} (1 - beta_s)."""
    betas = np.array([1e-4 + (0.02 - 1e-4) * i / (T - 1) for i in range(T)])
    return betas, np.cumprod(1.0 - betas)


def diffusers_scheduler(name, prediction="epsilon"):
    cls = getattr(reference_libraries()[1], name)
    return cls(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
               prediction_type={"epsilon": "epsilon", "v": "v_prediction"}[prediction],
               clip_sample=False, **({"set_alpha_to_one": True} if name == "DDIMScheduler" else {}))


def test_linear_schedule_matches_its_definition():
    betas, abar = reference_alphas_cumprod()
    ddpm = DDPM()
    np.testing.assert_allclose(ddpm.tables["betas"], betas, rtol=1e-12)
    np.testing.assert_allclose(ddpm.tables["alphas_cumprod"], abar, rtol=1e-12)
    # The posterior variance beta-tilde_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t (DDPM eq. 7).
    for t in (1, 10, 500, 999):
        np.testing.assert_allclose(ddpm.tables["posterior_variance"][t],
                                   (1 - abar[t - 1]) / (1 - abar[t]) * betas[t], rtol=1e-12)
    # Fewer steps span the same noise: ADM scales the end points by 1000 / T.
    np.testing.assert_allclose(linear_betas(250)[[0, -1]], [4e-4, 0.08])


def test_linear_schedule_matches_diffusers():
    theirs = diffusers_scheduler("DDPMScheduler")
    ddpm = DDPM()
    np.testing.assert_allclose(ddpm.tables["alphas_cumprod"], theirs.alphas_cumprod.numpy(), rtol=2e-5)
    for t in (1, 10, 500, 999):
        # diffusers recovers beta_t as 1 - abar_t / abar_{t-1} in f32, which keeps ~3 digits of it.
        np.testing.assert_allclose(ddpm.tables["posterior_variance"][t], theirs._get_variance(t).item(),
                                   rtol=1e-3)


def test_q_sample_and_velocity_match_diffusers():
    torch, _ = reference_libraries()
    rng = np.random.default_rng(0)
    x0, noise = rng.normal(size=(2, 4, 8, 8, 3)).astype(np.float32)
    t = np.array([0, 17, 500, 999], np.int32)
    theirs = diffusers_scheduler("DDPMScheduler")
    ddpm = DDPM()
    as_torch = lambda a: torch.from_numpy(np.ascontiguousarray(a))
    expected = theirs.add_noise(as_torch(x0), as_torch(noise), as_torch(t).long()).numpy()
    np.testing.assert_allclose(ddpm.q_sample(x0, t, noise), expected, atol=1e-5)
    expected_v = theirs.get_velocity(as_torch(x0), as_torch(noise), as_torch(t).long()).numpy()
    np.testing.assert_allclose(ddpm.velocity(x0, noise, t), expected_v, atol=1e-5)
    np.testing.assert_array_equal(DDPM(prediction="v").target(x0, noise, t), ddpm.velocity(x0, noise, t))
    np.testing.assert_array_equal(ddpm.target(x0, noise, t), noise)


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_one_ddim_step_matches_diffusers(prediction, eta):
    torch, _ = reference_libraries()
    theirs = diffusers_scheduler("DDIMScheduler", prediction)
    theirs.set_timesteps(10)
    np.testing.assert_array_equal(theirs.timesteps.numpy()[::-1], ddim_timesteps(T, 10))
    step = jax.jit(DDPM(prediction=prediction).ddim_step)
    rng = np.random.default_rng(1)
    for t in (900, 400, 0):  # the last: the step to x_0
        x_t, output, noise = rng.normal(size=(3, 2, 4, 4, 3)).astype(np.float32)
        expected = theirs.step(torch.from_numpy(output), t, torch.from_numpy(x_t), eta=eta,
                               variance_noise=torch.from_numpy(noise)).prev_sample.numpy()
        batch_t = jnp.full((2,), t)
        ours = step(output, x_t, batch_t, batch_t - 100, eta, noise)
        np.testing.assert_allclose(ours, expected, atol=1e-5)


def test_ddim_sampling_loop_matches_diffusers():
    """A whole 5-step DDIM run with a fixed toy denoiser (eps = 0.3 x + t / 2000), deterministic."""
    torch, _ = reference_libraries()
    theirs = diffusers_scheduler("DDIMScheduler")
    theirs.set_timesteps(5)
    x = np.random.default_rng(2).normal(size=(2, 4, 4, 3)).astype(np.float32)
    sample = torch.from_numpy(x)
    for t in theirs.timesteps:
        sample = theirs.step(0.3 * sample + t / 2000.0, t, sample, eta=0.0).prev_sample
    denoise = lambda x_t, t, cond: 0.3 * x_t + t[:, None, None, None] / 2000.0
    ours = DDPM(learn_sigma=False).ddim_sample(denoise, jnp.asarray(x), None, rng=jax.random.key(0), steps=5)
    np.testing.assert_allclose(ours, sample.numpy(), atol=1e-5)


def test_ddim_recovers_the_data_point_of_an_exact_denoiser():
    """For data that is a single point x0, the exact noise prediction at x_t is
    (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t): DDIM must land on x0 from any noise."""
    ddpm = DDPM(learn_sigma=False)
    x0 = jnp.linspace(-1.0, 1.0, 2 * 4 * 4 * 2).reshape(2, 4, 4, 2)
    abar = jnp.asarray(ddpm.tables["alphas_cumprod"], jnp.float32)

    def exact(x_t, t, cond):
        a = abar[t][:, None, None, None]
        return (x_t - jnp.sqrt(a) * x0) / jnp.sqrt(1.0 - a)

    noise = jax.random.normal(jax.random.key(3), x0.shape)
    sample = jax.jit(lambda eta: ddpm.ddim_sample(exact, noise, None, rng=jax.random.key(4), steps=20,
                                                  eta=eta))
    for eta in (0.0, 1.0):  # deterministic DDIM, and with DDPM's variance
        np.testing.assert_allclose(sample(eta), x0, atol=1e-4)


def test_guidance_scales_the_first_guided_channels_only():
    """One DDIM step (straight to x_0) with a denoiser that reads the class from `cond`: the guided
    channels get uncond + s (cond - uncond), the rest the conditional prediction (as DiT's
    forward_with_cfg on its first 3 channels); learned-variance channels are ignored."""
    ddpm = DDPM()
    labels, null = jnp.array([1.0, 2.0]), jnp.array([0.0, 0.0])

    def denoise(x_t, t, y):
        ramp = jnp.arange(1.0, 2 * x_t.shape[-1] + 1)  # eps then variance channels
        return 0.0 * x_t[..., :1] + y[:, None, None, None] * ramp

    noise = jnp.ones((2, 2, 2, 4))
    sample = ddpm.ddim_sample(denoise, noise, labels, null, rng=jax.random.key(0), steps=1,
                              guidance_scale=4.0, guided_channels=3)
    eps = labels[:, None] * jnp.array([4.0, 4.0, 4.0, 1.0]) * jnp.arange(1.0, 5.0)  # u + 4 (c - u), u = 0
    abar = ddpm.tables["alphas_cumprod"][0]
    expected = (1.0 - math.sqrt(1.0 - abar) * eps) / math.sqrt(abar)
    np.testing.assert_allclose(sample[:, 0, 0], expected, rtol=1e-4)  # f32 sqrt(1 - abar_0)
    everywhere = ddpm.ddim_sample(denoise, noise, labels, null, rng=jax.random.key(0), steps=1,
                                  guidance_scale=4.0)
    np.testing.assert_allclose(everywhere[:, 0, 0, 3], (1.0 - math.sqrt(1.0 - abar) * 4.0 * 4.0 * labels)
                               / math.sqrt(abar), rtol=1e-4)


def reference_hybrid_loss(output, x0, noise, t, prediction):
    """Improved DDPM's L_simple + L_vlb term at t in float64 numpy, from the papers' formulas."""
    betas, abar = reference_alphas_cumprod()
    abar_prev = np.append(1.0, abar[:-1])
    out = []
    for i in range(len(t)):
        s = t[i]
        a, b = abar[s], betas[s]
        pred, v = np.split(output[i].astype(np.float64), 2, axis=-1)
        x_t = math.sqrt(a) * x0[i] + math.sqrt(1 - a) * noise[i]
        target = noise[i] if prediction == "epsilon" else math.sqrt(a) * noise[i] - math.sqrt(1 - a) * x0[i]
        mse = np.mean((target - pred) ** 2)
        if prediction == "epsilon":
            x0_hat = (x_t - math.sqrt(1 - a) * pred) / math.sqrt(a)
        else:
            x0_hat = math.sqrt(a) * x_t - math.sqrt(1 - a) * pred
        posterior_mean = lambda z0: (math.sqrt(abar_prev[s]) * b * z0
                                     + math.sqrt(1 - b) * (1 - abar_prev[s]) * x_t) / (1 - a)
        tilde = lambda k: (1 - abar_prev[k]) / (1 - abar[k]) * betas[k]
        log_tilde = math.log(tilde(max(s, 1)))  # beta-tilde_0 = 0: clipped to beta-tilde_1
        log_var = (v + 1) / 2 * math.log(b) + (1 - (v + 1) / 2) * log_tilde
        mean = posterior_mean(x0_hat)
        if s > 0:  # KL of two Gaussians, in bits
            kl = 0.5 * (-1 + log_var - log_tilde + np.exp(log_tilde - log_var)
                        + (posterior_mean(x0[i]) - mean) ** 2 * np.exp(-log_var))
            vlb = np.mean(kl) / math.log(2)
        else:  # decoder: the Gaussian's mass on x0's 1/127.5-wide bin (ADM's tanh CDF)
            cdf = lambda z: 0.5 * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))
            std = np.exp(0.5 * log_var)
            mass = cdf((x0[i] - mean + 1 / 255) / std) - cdf((x0[i] - mean - 1 / 255) / std)
            vlb = -np.mean(np.log(np.maximum(mass, 1e-12))) / math.log(2)
        out.append((mse + vlb, mse, vlb))
    return np.array(out)


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_hybrid_loss_matches_the_papers_formulas(prediction):
    rng = np.random.default_rng(5)
    x0 = rng.uniform(-0.9, 0.9, size=(4, 4, 4, 2)).astype(np.float32)
    noise = rng.normal(size=x0.shape).astype(np.float32)
    output = np.concatenate([noise + 0.1 * rng.normal(size=x0.shape),
                             rng.uniform(-1, 1, size=x0.shape)], axis=-1).astype(np.float32)
    t = np.array([0, 1, 250, 999], np.int32)
    losses = jax.jit(DDPM(prediction=prediction).loss)(output, x0, noise, t)
    expected = reference_hybrid_loss(output, x0, noise, t, prediction)
    for k, name in enumerate(("loss", "mse", "vlb")):
        np.testing.assert_allclose(losses[name], expected[:, k], rtol=2e-4, atol=1e-6, err_msg=name)


def test_vlb_trains_the_variance_and_mse_the_prediction():
    """The stop-gradient of ADM's hybrid loss: the variational term sends no gradient to the
    prediction channels, the squared error none to the variance channels."""
    ddpm = DDPM()
    rng = np.random.default_rng(6)
    x0, noise = rng.normal(size=(2, 2, 4, 4, 2)).astype(np.float32)
    output = jnp.asarray(rng.normal(size=(2, 4, 4, 4)) * 0.5, jnp.float32)
    t = jnp.array([3, 700])
    grad = lambda term: jax.grad(lambda o: jnp.sum(ddpm.loss(o, x0, noise, t)[term]))
    g_vlb, g_mse = jax.jit(lambda o: (grad("vlb")(o), grad("mse")(o)))(output)
    assert np.all(g_vlb[..., :2] == 0) and np.any(g_vlb[..., 2:] != 0)
    assert np.all(g_mse[..., 2:] == 0) and np.any(g_mse[..., :2] != 0)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="Unknown prediction"):
        DDPM(prediction="x0")
    with pytest.raises(ValueError, match="steps"):
        ddim_timesteps(T, 1001)
    with pytest.raises(ValueError, match="2 x channels"):
        DDPM().split_output(jnp.zeros((1, 2, 2, 3)))
    with pytest.raises(ValueError, match="needs `uncond`"):
        DDPM().ddim_sample(lambda x, t, c: x, jnp.zeros((1, 2, 2, 4)), None, rng=jax.random.key(0),
                           guidance_scale=2.0)
    with pytest.raises(ValueError, match="guided_channels"):
        DDPM().ddim_sample(lambda x, t, c: x, jnp.zeros((1, 2, 2, 4)), 0, 0, rng=jax.random.key(0),
                           guidance_scale=2.0, guided_channels=5)
