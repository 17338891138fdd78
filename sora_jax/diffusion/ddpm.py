"""DDPM and DDIM as the DiT paper trains and samples: the discrete Gaussian diffusion of Ho et al. with
the learned variance and hybrid loss of Improved DDPM / ADM (Nichol & Dhariwal), which DiT reuses.

Convention: integer steps t = 0 ... T - 1 (T = 1000), x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps
with abar_t = prod_{s <= t} (1 - beta_s) and linear betas from 1e-4 to 0.02. The network sees the
integer step t. It predicts eps ('epsilon', the paper's choice) or v = sqrt(abar_t) eps -
sqrt(1 - abar_t) x_0 ('v', Salimans & Ho), and with learn_sigma as many channels again: v_sigma in
[-1, 1], which interpolates the log variance of p(x_{t-1} | x_t) between the posterior's beta-tilde_t
and beta_t. Arrays are channels-last, [B, ..., C] (the network's output [B, ..., 2C] with learn_sigma).

Everything here is a pure function of arrays (the schedule is a table of constants), so it jits, and
the sampler runs as one `lax.fori_loop`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PREDICTIONS = ("epsilon", "v")

# (x_t [B, ..., C], t int [B], cond) -> network output [B, ..., C or 2C]. `cond` is any pytree of
# [B, ...] arrays (for the class DiT: labels and drop-label flags); guidance concatenates a
# conditional and an unconditional one along the batch.
Denoiser = Callable[[jax.Array, jax.Array, Any], jax.Array]


def linear_betas(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """The linear schedule of DDPM, float64 [num_steps]. As in ADM, the end points scale with
    1000 / num_steps, so that any number of steps spans the same amount of noise."""
    scale = 1000.0 / num_steps
    return np.linspace(scale * beta_start, scale * beta_end, num_steps, dtype=np.float64)


def ddim_timesteps(num_steps: int, steps: int) -> np.ndarray:
    """The respaced steps a `steps`-step DDIM visits, ascending: 0, k, 2k, ... with k = num_steps //
    steps (ADM's 'ddimN' spacing; diffusers' 'leading'), int32 [steps]."""
    if not 1 <= steps <= num_steps:
        raise ValueError(f"DDIM needs 1 <= steps <= {num_steps} (the training steps), got {steps}")
    return (np.arange(steps) * (num_steps // steps)).astype(np.int32)


def _mean_flat(x: jax.Array) -> jax.Array:
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1, log_var1, mean2, log_var2) -> jax.Array:
    """KL(N(mean1, exp(log_var1)) || N(mean2, exp(log_var2))), elementwise, in nats."""
    return 0.5 * (-1.0 + log_var2 - log_var1 + jnp.exp(log_var1 - log_var2)
                  + jnp.square(mean1 - mean2) * jnp.exp(-log_var2))


def _approx_standard_normal_cdf(x: jax.Array) -> jax.Array:
    # ADM's tanh approximation of the standard normal CDF (kept for parity).
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x: jax.Array, mean: jax.Array, log_scale: jax.Array) -> jax.Array:
    """log P(x) elementwise of x in [-1, 1] quantised to 256 bins under N(mean, exp(log_scale)^2), the
    edge bins taking the tails (DDPM's decoder at t = 0)."""
    centered = x - mean
    inv_std = jnp.exp(-log_scale)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))


@dataclasses.dataclass(frozen=True)
class DDPM:
    """The discrete diffusion, its training loss and its reverse-process parameters.

    Attributes:
      num_steps: T, the number of training steps (1000 in the paper).
      beta_start, beta_end: the linear schedule's end points (for T = 1000).
      prediction: what the network's first C output channels are: 'epsilon' or 'v'.
      learn_sigma: whether C more channels interpolate the reverse process's log variance (the
        paper: yes); without, the loss is L_simple alone.
      vlb_weight: weight of the variational term next to L_simple (ADM's MSE loss type: 1).
    """

    num_steps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction: str = "epsilon"
    learn_sigma: bool = True
    vlb_weight: float = 1.0

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"Unknown prediction {self.prediction!r}; valid: {PREDICTIONS}.")
        if self.num_steps < 2:
            raise ValueError(f"num_steps must be at least 2, got {self.num_steps}.")
        if not 0.0 < self.beta_start < self.beta_end * 1000.0 / self.num_steps < 1.0:
            raise ValueError(f"Need 0 < beta_start < beta_end and scaled betas below 1; got beta_start="
                             f"{self.beta_start}, beta_end={self.beta_end} for {self.num_steps} steps.")

    # The schedule: float64 tables computed once, gathered per example in f32. -------------------

    @functools.cached_property
    def tables(self) -> dict[str, np.ndarray]:
        """float64 [T] tables: betas, alphas_cumprod (abar_t), alphas_cumprod_prev (abar_{t-1}, 1 at
        t = 0), posterior_variance (beta-tilde_t), its log clipped at t = 0 to t = 1's (the t = 0
        posterior has variance 0), the posterior mean's coefficients of x_0 and x_t, and log betas."""
        betas = linear_betas(self.num_steps, self.beta_start, self.beta_end)
        alphas_cumprod = np.cumprod(1.0 - betas)
        prev = np.append(1.0, alphas_cumprod[:-1])
        posterior_variance = betas * (1.0 - prev) / (1.0 - alphas_cumprod)
        return {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": prev,
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": np.log(np.append(posterior_variance[1],
                                                               posterior_variance[1:])),
            "posterior_mean_coef_x0": betas * np.sqrt(prev) / (1.0 - alphas_cumprod),
            "posterior_mean_coef_xt": (1.0 - prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod),
            "log_betas": np.log(betas),
        }

    def _at(self, name: str, t: jax.Array, like: jax.Array) -> jax.Array:
        """tables[name][t] for t [B], shaped [B, 1, ...] to broadcast against `like`."""
        values = jnp.asarray(self.tables[name], jnp.float32)[t]
        return values.reshape(values.shape + (1,) * (like.ndim - 1))

    # Forward process ----------------------------------------------------------------------------

    def sample_timesteps(self, rng: jax.Array, batch: int) -> jax.Array:
        """Training steps, uniform over 0 ... T - 1: int32 [batch]."""
        return jax.random.randint(rng, (batch,), 0, self.num_steps, jnp.int32)

    def q_sample(self, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise; t: int [B]."""
        abar = self._at("alphas_cumprod", t, x0)
        return jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * noise

    def velocity(self, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
        """v = sqrt(abar_t) noise - sqrt(1 - abar_t) x_0."""
        abar = self._at("alphas_cumprod", t, x0)
        return jnp.sqrt(abar) * noise - jnp.sqrt(1.0 - abar) * x0

    def target(self, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
        """What the network's first C channels regress: noise ('epsilon') or v ('v')."""
        return noise if self.prediction == "epsilon" else self.velocity(x0, noise, t)

    def q_posterior(self, x0: jax.Array, x_t: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Mean and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        mean = (self._at("posterior_mean_coef_x0", t, x_t) * x0
                + self._at("posterior_mean_coef_xt", t, x_t) * x_t)
        return mean, jnp.broadcast_to(self._at("posterior_log_variance_clipped", t, x_t), x_t.shape)

    # Reverse process ----------------------------------------------------------------------------

    def split_output(self, output: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """Network output -> (prediction [B, ..., C], variance values [B, ..., C] or None)."""
        if not self.learn_sigma:
            return output, None
        if output.shape[-1] % 2:
            raise ValueError(f"with learn_sigma the network outputs 2 x channels, got {output.shape[-1]} "
                             "channels; build the model with learn_sigma (out_channels = 2 x in_channels)")
        return jnp.split(output, 2, axis=-1)

    def predict_x0_eps(self, prediction: jax.Array, x_t: jax.Array,
                       t: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(x_0, eps) implied by the network's eps or v prediction at x_t."""
        abar = self._at("alphas_cumprod", t, x_t)
        a, s = jnp.sqrt(abar), jnp.sqrt(1.0 - abar)
        if self.prediction == "epsilon":
            return (x_t - s * prediction) / a, prediction
        return a * x_t - s * prediction, s * x_t + a * prediction

    def p_mean_variance(self, output: jax.Array, x_t: jax.Array, t: jax.Array) -> dict[str, jax.Array]:
        """Mean and log variance of p(x_{t-1} | x_t) and the predicted x_0.

        With learn_sigma the log variance is frac * log beta_t + (1 - frac) * log beta-tilde_t,
        frac = (v_sigma + 1) / 2; without, log beta-tilde_t (clipped at t = 0). x_0 is not clipped:
        latents have no fixed range (DiT samples with clip_denoised=False)."""
        prediction, values = self.split_output(output.astype(jnp.float32))
        x0, _ = self.predict_x0_eps(prediction, x_t, t)
        mean, min_log = self.q_posterior(x0, x_t, t)
        if values is None:
            log_variance = min_log
        else:
            frac = (values + 1.0) / 2.0
            log_variance = frac * self._at("log_betas", t, x_t) + (1.0 - frac) * min_log
        return {"mean": mean, "log_variance": log_variance, "pred_x0": x0}

    # Training loss ------------------------------------------------------------------------------

    def vlb_bits(self, output: jax.Array, x0: jax.Array, x_t: jax.Array, t: jax.Array) -> jax.Array:
        """The variational bound's term at t, bits per dimension [B]: KL(q(x_{t-1} | x_t, x_0) ||
        p(x_{t-1} | x_t)) for t > 0, the discretised decoder's negative log likelihood at t = 0."""
        true_mean, true_log_var = self.q_posterior(x0, x_t, t)
        p = self.p_mean_variance(output, x_t, t)
        kl = _mean_flat(normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"])) / math.log(2.0)
        nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"]))
        return jnp.where(t == 0, nll / math.log(2.0), kl)

    def loss(self, output: jax.Array, x0: jax.Array, noise: jax.Array, t: jax.Array) -> dict[str, jax.Array]:
        """The per-example training loss of ADM's hybrid objective, as DiT trains: {'loss', 'mse',
        'vlb'}, each [B].

        mse is L_simple, the mean squared error of the prediction against its target (noise or v).
        With learn_sigma, vlb is the variational term at t (`vlb_bits`) computed with the
        prediction's gradient stopped, so it trains only the variance channels while L_simple alone
        trains the mean; loss = mse + vlb_weight * vlb. With vlb_weight 1 and T = 1000 this is
        L_simple + 0.001 L_vlb of Improved DDPM (L_vlb sums its T per-step terms).
        """
        output = output.astype(jnp.float32)
        prediction, values = self.split_output(output)
        mse = _mean_flat(jnp.square(self.target(x0, noise, t) - prediction))
        if values is None:
            return {"loss": mse, "mse": mse, "vlb": jnp.zeros_like(mse)}
        frozen = jnp.concatenate([jax.lax.stop_gradient(prediction), values], axis=-1)
        vlb = self.vlb_bits(frozen, x0, self.q_sample(x0, t, noise), t)
        return {"loss": mse + self.vlb_weight * vlb, "mse": mse, "vlb": vlb}

    # DDIM ---------------------------------------------------------------------------------------

    def ddim_step(self, prediction: jax.Array, x_t: jax.Array, t: jax.Array, t_prev: jax.Array,
                  eta: float, noise: jax.Array) -> jax.Array:
        """One DDIM update from step t to t_prev (< t; -1 for the final step to x_0), t and t_prev int [B]:
        x_prev = sqrt(abar_prev) x_0 + sqrt(1 - abar_prev - sigma^2) eps + sigma noise, with
        sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev). eta = 0 is
        deterministic DDIM; eta = 1 has the variance of DDPM's ancestral step. prediction: the
        network's eps or v (its first C channels)."""
        x0, eps = self.predict_x0_eps(prediction.astype(jnp.float32), x_t, t)
        abar = self._at("alphas_cumprod", t, x_t)
        final = (t_prev < 0).reshape(abar.shape)  # the step to x_0: abar_prev = 1
        abar_prev = jnp.where(final, 1.0, self._at("alphas_cumprod", jnp.maximum(t_prev, 0), x_t))
        sigma = eta * jnp.sqrt((1.0 - abar_prev) / (1.0 - abar)) * jnp.sqrt(1.0 - abar / abar_prev)
        direction = jnp.sqrt(jnp.maximum(1.0 - abar_prev - sigma ** 2, 0.0)) * eps
        return jnp.sqrt(abar_prev) * x0 + direction + sigma * noise

    def ddim_sample(self, denoise: Denoiser, noise: jax.Array, cond: Any, uncond: Any = None, *,
                    rng: jax.Array, steps: int = 50, eta: float = 0.0, guidance_scale: float = 1.0,
                    guided_channels: int | None = None) -> jax.Array:
        """Samples x_0 [B, ..., C] from noise [B, ..., C] in `steps` DDIM steps (`ddim_timesteps`).

        Classifier-free guidance (guidance_scale != 1): the conditional and unconditional (`uncond`,
        e.g. the null class) branches run as one batch, and the prediction becomes
        uncond + guidance_scale * (cond - uncond) on its first guided_channels channels (None: all);
        the other channels keep the conditional prediction. DiT's released sampling guides only the
        first 3 of the 4 latent channels ("for exact reproducibility", forward_with_cfg):
        guided_channels=3 reproduces it; the default guides all, the standard approach. The learned
        variance channels are not used: DDIM's variance comes from eta. rng: the per-step noise for
        eta > 0.
        """
        if guidance_scale != 1.0 and uncond is None:
            raise ValueError("classifier-free guidance (guidance_scale != 1) needs `uncond`, e.g. "
                             "labels with drop_labels=True for the null class")
        channels = noise.shape[-1]
        guided = channels if guided_channels is None else guided_channels
        if not 1 <= guided <= channels:
            raise ValueError(f"guided_channels must be in [1, {channels}], got {guided_channels}")
        timesteps = jnp.asarray(ddim_timesteps(self.num_steps, steps))
        batch = noise.shape[0]

        def predict(x, t):
            if guidance_scale == 1.0:
                return denoise(x, t, cond)[..., :channels]
            both = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), cond, uncond)
            out = denoise(jnp.concatenate([x, x]), jnp.concatenate([t, t]), both)[..., :channels]
            c, u = out[:batch].astype(jnp.float32), out[batch:].astype(jnp.float32)
            return jnp.concatenate([u[..., :guided] + guidance_scale * (c[..., :guided] - u[..., :guided]),
                                    c[..., guided:]], axis=-1)

        def body(i, x):
            index = steps - 1 - i
            t = jnp.full((batch,), timesteps[index], jnp.int32)
            t_prev = jnp.full((batch,), jnp.where(index > 0, timesteps[jnp.maximum(index - 1, 0)], -1),
                              jnp.int32)
            step_noise = jax.random.normal(jax.random.fold_in(rng, i), x.shape, jnp.float32)
            return self.ddim_step(predict(x, t), x, t, t_prev, eta, step_noise)

        return jax.lax.fori_loop(0, steps, body, noise.astype(jnp.float32))
