"""The video-autoencoder experiment (`config.task = 'vae'`): the causal VAE, its losses and the
discriminator, trained by the same loop as the DiT (training/loop.py).

    python -m sora_jax.train --config=configs/vae_moving_shapes.py --workdir=workdirs/vae

Each checkpoint also holds `latent_stats` (per-channel shift and scale of posterior means on
training clips), so `load_vae(workdir)` returns everything a DiT needs to encode and decode.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sora_jax.models import vae as vae_lib
from sora_jax.models.discriminator import PatchDiscriminator3D
from sora_jax.training import state as state_lib
from sora_jax.training.experiment import ExperimentBase, to_uint8, validate_common
from sora_jax.training.vae_step import VAELoss, make_vae_eval_step, make_vae_train_step


def validate_vae(config: ml_collections.ConfigDict) -> vae_lib.CausalVAE:
    """Fails early on inconsistent VAE settings; returns the VAE the config describes."""
    validate_common(config)
    vae = vae_lib.get_autoencoder("causal_vae", **config.vae)
    vae.latent_shape(config.data.frames, config.data.height, config.data.width)
    VAELoss(**config.loss)
    return vae


@dataclasses.dataclass
class VAEExperiment(ExperimentBase):
    """A causal video VAE experiment, built from its config on the current devices."""

    config: ml_collections.ConfigDict
    devices: Any = None

    def __post_init__(self):
        c = self.config
        self.vae = validate_vae(c)
        self._setup_common(self.devices)
        self.loss = VAELoss(**c.loss)
        self.discriminator = None
        if self.loss.adversarial:
            self.discriminator = PatchDiscriminator3D(widths=tuple(c.discriminator.widths))
            self.disc_schedule = state_lib.learning_rate_schedule(
                learning_rate=c.discriminator.learning_rate, warmup_steps=c.optim.warmup_steps,
                total_steps=c.train.num_steps, decay="constant")
            self.disc_tx = state_lib.adamw(self.disc_schedule, b1=0.5, b2=0.9, weight_decay=0.0,
                                           grad_clip=c.optim.grad_clip)

    def batch_shapes(self, batch_size: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
        c = self.config.data
        b = c.batch_size if batch_size is None else batch_size
        return {"video": jax.ShapeDtypeStruct((b, c.frames, c.height, c.width, 3), jnp.float32)}

    def _init_boxed(self, rng: jax.Array) -> state_lib.TrainState:
        rng_vae, rng_disc = jax.random.split(rng)
        video = jnp.zeros(self.batch_shapes(1)["video"].shape, jnp.float32)
        params = self.vae.net.init(rng_vae, video)["params"]
        groups = {"vae": state_lib.Group.create(params, self.tx, self.config.optim.ema_decay)}
        if self.discriminator is not None:
            disc = self.discriminator.init(rng_disc, video)["params"]
            groups["disc"] = state_lib.Group.create(disc, self.disc_tx, 0.0)
        return state_lib.TrainState(step=jnp.zeros((), jnp.int32), groups=groups)

    def jit_train_step(self, *, donate: bool = True):
        step = make_vae_train_step(
            self.vae, self.loss, tx=self.tx, schedule=self.schedule,
            ema_decay=self.config.optim.ema_decay, discriminator=self.discriminator,
            disc_tx=getattr(self, "disc_tx", None))
        return self.jit_step(step, self.batch_shapes(), donate=donate)

    @functools.cached_property
    def eval_step(self):
        return jax.jit(make_vae_eval_step(self.vae))

    # The loop's hooks -----------------------------------------------------------------------------

    def describe(self, state) -> str:
        n = sum(x.size for x in jax.tree.leaves(state.groups["vae"].params))
        c = self.config.data
        t, h, w, ch = self.vae.latent_shape(c.frames, c.height, c.width)
        ratio = c.frames * c.height * c.width * 3 / (t * h * w * ch)
        return (f"VAE: {n / 1e6:.2f}M parameters, clips {c.frames}x{c.height}x{c.width} -> latents "
                f"{t}x{h}x{w}x{ch} ({ratio:.0f}x fewer values)")

    def make_batch(self, host: dict) -> dict[str, jax.Array]:
        return self.global_batch({"video": host["video"]})

    def throughput(self, steps_per_s: float) -> dict[str, float]:
        return {"steps_per_s": steps_per_s,
                "frames_per_s": steps_per_s * self.config.data.batch_size * self.config.data.frames}

    def validation_scalars(self, state, batches) -> dict[str, float]:
        outs = [self.eval_step(state, b) for b in batches]
        return {"val/psnr": float(np.mean([np.asarray(o["psnr"]) for o in outs])),
                "val/l1": float(np.mean([np.asarray(o["l1"]) for o in outs]))}

    def write_samples(self, state, step: int, workdir: str, batches) -> str:
        """Originals above their reconstructions, side by side."""
        from sora_jax.data.video_io import write_video
        video = batches[0]["video"][: self.config.train.num_samples]
        recon = self.eval_step(state, {"video": video})["reconstruction"]
        pairs = np.concatenate([to_uint8(jax.device_get(video)), to_uint8(jax.device_get(recon))],
                               axis=2)
        return write_video(os.path.join(workdir, "samples", f"step_{step:06d}.gif"), pairs)

    def checkpoint_items(self, state, batches) -> dict[str, dict]:
        """Latent statistics of the current weights on fixed training clips."""
        params = state.groups["vae"].inference_params
        means = [np.asarray(self._moments(params, b["video"])[0]) for b in batches]
        stats = vae_lib.latent_statistics(means)
        return {"latent_stats": {k: v.tolist() for k, v in stats.items()}}

    @functools.cached_property
    def _moments(self):
        return jax.jit(lambda p, v: self.vae.net.apply({"params": p}, v,
                                                       method=vae_lib.VAENet.encode))


def load_vae(workdir: str, step: int | None = None) -> tuple[vae_lib.CausalVAE, dict]:
    """(CausalVAE, params) from a VAE training workdir: EMA weights and latent statistics."""
    from sora_jax.training.checkpoint import restore_for_inference
    from sora_jax.training.loop import load_config
    config = load_config(workdir)
    if config.get("task") != "vae":
        raise ValueError(f"{workdir!r} was trained for task {config.get('task')!r}, not a VAE; "
                         "point config.autoencoder.workdir at a VAE workdir "
                         "(python -m sora_jax.train --config=configs/vae_moving_shapes.py ...).")
    with config.unlocked():
        config.mesh = dict(data=1, fsdp=1, tensor=1, sequence=1)
        config.data.batch_size = 1
    exp = VAEExperiment(config, devices=jax.devices()[:1])
    state, step, items = restore_for_inference(workdir, exp.abstract_state(), step,
                                               json_items=("latent_stats",))
    stats = items["latent_stats"]
    params = {"net": state.groups["vae"].inference_params,
              "shift": jnp.asarray(stats["shift"], jnp.float32),
              "scale": jnp.asarray(stats["scale"], jnp.float32)}
    return exp.vae, params
