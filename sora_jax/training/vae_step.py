"""The video-autoencoder training and evaluation steps: pure functions of (state, batch, rng).

The state has group 'vae' (encoder and decoder) and, with an adversarial loss, group 'disc' (the
3D patch discriminator). One step:

  reconstruction = decoder(sample of the posterior of encoder(video))
  loss_vae  = pixel loss (L1 or L2) + kl_weight * KL
              + [step >= disc_start] * disc_weight * adaptive weight * (-D(reconstruction))
  loss_disc = [step >= disc_start] * hinge(D(video), D(reconstruction))

Batches hold pixels: video float32 [B, T, H, W, 3] in [-1, 1].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from sora_jax.models import discriminator as disc_lib
from sora_jax.models.vae import CausalVAE, kl_divergence
from sora_jax.training.state import TrainState

Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class VAELoss:
    """Weights of the autoencoder's loss terms (config.loss)."""

    pixel: str = "l1"
    kl_weight: float = 1e-4
    disc_weight: float = 0.0
    disc_start: int = 0

    def __post_init__(self):
        if self.pixel not in ("l1", "l2"):
            raise ValueError(f"config.loss.pixel={self.pixel!r}; valid: 'l1', 'l2'.")
        if self.kl_weight < 0 or self.disc_weight < 0 or self.disc_start < 0:
            raise ValueError("config.loss.kl_weight, disc_weight and disc_start must be >= 0.")

    @property
    def adversarial(self) -> bool:
        return self.disc_weight > 0

    def pixel_loss(self, reconstruction: jax.Array, video: jax.Array) -> jax.Array:
        diff = reconstruction - video
        return jnp.mean(jnp.abs(diff) if self.pixel == "l1" else jnp.square(diff))


def kl_per_value(mean: jax.Array, logvar: jax.Array, video: jax.Array) -> jax.Array:
    """KL of the posterior in nats per video value (per pixel channel), batch mean."""
    return jnp.mean(kl_divergence(mean, logvar)) / (video[0].size)


def psnr(reconstruction: jax.Array, video: jax.Array) -> jax.Array:
    """Peak signal-to-noise ratio per clip in dB, for videos in [-1, 1]: [B]."""
    mse = jnp.mean(jnp.square((jnp.clip(reconstruction, -1, 1) - video) / 2.0),
                   axis=tuple(range(1, video.ndim)))
    return -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))


def make_vae_train_step(vae: CausalVAE, loss: VAELoss, *, tx: optax.GradientTransformation,
                        schedule: optax.Schedule, ema_decay: float,
                        discriminator: disc_lib.PatchDiscriminator3D | None = None,
                        disc_tx: optax.GradientTransformation | None = None
                        ) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, dict]]:
    """Returns train_step(state, batch, rng) -> (state, metrics)."""
    net = vae.net
    if loss.adversarial and discriminator is None:
        raise ValueError("An adversarial loss (config.loss.disc_weight > 0) needs a discriminator.")

    def train_step(state: TrainState, batch: Batch, rng: jax.Array):
        rng = jax.random.fold_in(rng, state.step)
        video = batch["video"]
        g = state.groups["vae"]
        adversarial_on = (state.step >= loss.disc_start).astype(jnp.float32)

        def losses(params):
            reconstruction, mean, logvar = net.apply({"params": params}, video, rng)
            pixel = loss.pixel_loss(reconstruction, video)
            kl = kl_per_value(mean, logvar, video)
            fool = jnp.zeros(())
            if loss.adversarial:
                fake = discriminator.apply({"params": state.groups["disc"].params}, reconstruction)
                fool = disc_lib.generator_loss(fake)
            return (pixel + loss.kl_weight * kl, fool), (pixel, kl, reconstruction)

        (base, fool), vjp, (pixel, kl, reconstruction) = jax.vjp(losses, g.params, has_aux=True)
        grads = vjp((jnp.ones(()), jnp.zeros(())))[0]
        metrics = {"loss": base, "pixel_loss": pixel, "kl": kl,
                   "psnr": jnp.mean(psnr(reconstruction, video))}
        groups = dict(state.groups)
        if loss.adversarial:
            fool_grads = vjp((jnp.zeros(()), jnp.ones(())))[0]
            last = lambda p: p["decoder"]["conv_out"]
            weight = loss.disc_weight * adversarial_on * disc_lib.adaptive_weight(
                last(grads), last(fool_grads))
            grads = jax.tree.map(lambda a, b: a + weight * b, grads, fool_grads)
            d = state.groups["disc"]
            fake = jax.lax.stop_gradient(reconstruction)

            def disc_loss(params):
                logits = lambda x: discriminator.apply({"params": params}, x)
                return disc_lib.hinge_discriminator_loss(logits(video), logits(fake))

            d_loss, d_grads = jax.value_and_grad(disc_loss)(d.params)
            d_grads = jax.tree.map(lambda x: adversarial_on * x, d_grads)
            groups["disc"] = d.apply_gradients(d_grads, disc_tx, 0.0)
            metrics.update(generator_loss=fool, adaptive_weight=weight, disc_loss=d_loss)
            metrics["loss"] = base + weight * fool
        metrics.update(grad_norm=optax.tree.norm(grads), learning_rate=schedule(state.step))
        groups["vae"] = g.apply_gradients(grads, tx, ema_decay)
        return state.replace(step=state.step + 1, groups=groups), metrics

    return train_step


def make_vae_eval_step(vae: CausalVAE) -> Callable[[TrainState, Batch], dict]:
    """Returns eval_step(state, batch) -> {'psnr': [B], 'l1': [B], 'reconstruction'} with the
    posterior mean and the EMA weights."""
    net = vae.net

    def eval_step(state: TrainState, batch: Batch) -> dict:
        video = batch["video"]
        reconstruction, _, _ = net.apply({"params": state.groups["vae"].inference_params}, video)
        reconstruction = jnp.clip(reconstruction, -1.0, 1.0)
        return {"psnr": psnr(reconstruction, video),
                "l1": jnp.mean(jnp.abs(reconstruction - video), axis=tuple(range(1, video.ndim))),
                "reconstruction": reconstruction}

    return eval_step
