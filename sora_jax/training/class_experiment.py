"""The DiT paper's experiment (`config.task = 'class_dit'`): a class-conditional image DiT
(models/class_dit.py) trained with the DDPM hybrid objective (diffusion/ddpm.py), sampled with DDIM
and classifier-free guidance; see configs/dit_imagenet.py.

Batches hold latents and labels:
  latent: float32 [B, H, W, C] (for a pixel-space run, the first frame of each clip in [-1, 1])
  label: int32 [B]
The pure train step draws each example's step t, its noise and whether its label is dropped (the
null class, for guidance), and updates the 'dit' group of the TrainState with `training.step`'s
shared update (gradient accumulation, EMA).

The experiment provides the hooks training/loop.py calls (describe, make_batch, throughput,
validation_scalars, write_samples) and the shapes and shardings the config tests use.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from sora_jax.diffusion.ddpm import DDPM
from sora_jax.models import class_dit
from sora_jax.training import state as state_lib
from sora_jax.training.experiment import DTYPES, ExperimentBase, to_uint8, validate_common
from sora_jax.training.step import _update

Batch = dict[str, jax.Array]


def ddpm_loss(model: class_dit.ClassDiT, ddpm: DDPM, params, batch: Batch) -> jax.Array:
    """Mean hybrid DDPM loss of a batch that carries its draw: t, noise and drop_labels."""
    x0, t, noise = batch["latent"], batch["t"], batch["noise"]
    output = model.apply({"params": params}, ddpm.q_sample(x0, t, noise), t, batch["label"],
                         batch["drop_labels"])
    return jnp.mean(ddpm.loss(output, x0, noise, t)["loss"])


def make_class_train_step(model: class_dit.ClassDiT, ddpm: DDPM, *, tx: optax.GradientTransformation,
                          schedule: optax.Schedule, ema_decay: float, class_dropout: float,
                          grad_accum_steps: int = 1,
                          group: str = "dit") -> Callable[[state_lib.TrainState, Batch, jax.Array], tuple]:
    """Returns train_step(state, batch, rng) -> (state, metrics), pure and jittable: DiT's training
    step (uniform t, Gaussian noise, labels dropped with probability class_dropout)."""
    grad_fn = jax.value_and_grad(functools.partial(ddpm_loss, model, ddpm))

    def train_step(state: state_lib.TrainState, batch: Batch, rng: jax.Array):
        rng_t, rng_noise, rng_drop = jax.random.split(jax.random.fold_in(rng, state.step), 3)
        x0 = batch["latent"]
        batch = {**batch, "t": ddpm.sample_timesteps(rng_t, x0.shape[0]),
                 "noise": jax.random.normal(rng_noise, x0.shape, x0.dtype),
                 "drop_labels": jax.random.bernoulli(rng_drop, class_dropout, (x0.shape[0],))}
        return _update(state, batch, grad_fn, tx=tx, schedule=schedule, ema_decay=ema_decay,
                       grad_accum_steps=grad_accum_steps, group=group)

    return train_step


def validate_class(config: ml_collections.ConfigDict) -> None:
    """Fails early, naming the setting, on values that do not fit together."""
    validate_common(config)
    model, data = config.model, config.data
    class_dit.model_size(model.name)
    if model.dtype not in DTYPES:
        raise ValueError(f"config.model.dtype={model.dtype!r}; valid: {sorted(DTYPES)}.")
    if data.image_size % class_dit.model_size(model.name)["patch_size"]:
        raise ValueError(f"config.data.image_size={data.image_size} is not a multiple of the patch size "
                         f"of config.model.name={model.name!r}.")
    if not 0.0 <= config.class_dropout < 1.0:
        raise ValueError(f"config.class_dropout must be in [0, 1), got {config.class_dropout}.")
    if config.class_dropout > 0 and not model.null_class:
        raise ValueError("config.class_dropout > 0 needs config.model.null_class=True (the class "
                         "dropped labels become).")
    DDPM(learn_sigma=model.learn_sigma, **config.diffusion)


@dataclasses.dataclass
class ClassExperiment(ExperimentBase):
    """A class-conditional image DiT experiment, built from its config on the current devices."""

    config: ml_collections.ConfigDict
    devices: Any = None

    def __post_init__(self):
        validate_class(self.config)
        c = self.config
        self._setup_common(self.devices)
        model = {k: v for k, v in c.model.items() if k != "dtype"}
        self.model = class_dit.from_config(model, dtype=DTYPES[c.model.dtype])
        self.ddpm = DDPM(learn_sigma=c.model.learn_sigma, **c.diffusion)

    def batch_shapes(self, batch_size: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
        d = self.config.data
        b = d.batch_size if batch_size is None else batch_size
        return {"latent": jax.ShapeDtypeStruct((b, d.image_size, d.image_size, self.model.in_channels),
                                               jnp.float32),
                "label": jax.ShapeDtypeStruct((b,), jnp.int32)}

    def _init_boxed(self, rng: jax.Array) -> state_lib.TrainState:
        shapes = self.batch_shapes(1)
        params = self.model.init(rng, jnp.zeros(shapes["latent"].shape), jnp.zeros((1,), jnp.int32),
                                 jnp.zeros((1,), jnp.int32))["params"]
        group = state_lib.Group.create(params, self.tx, self.config.optim.ema_decay)
        return state_lib.TrainState(step=jnp.zeros((), jnp.int32), groups={"dit": group})

    def jit_train_step(self, *, donate: bool = True):
        c = self.config
        step = make_class_train_step(self.model, self.ddpm, tx=self.tx, schedule=self.schedule,
                                     ema_decay=c.optim.ema_decay, class_dropout=c.class_dropout,
                                     grad_accum_steps=c.optim.grad_accum_steps)
        return self.jit_step(step, self.batch_shapes(), donate=donate)

    def train_flops_per_step(self) -> float:
        """Forward + backward (3x forward) model FLOPs over the global batch."""
        d = self.config.data
        return 3.0 * self.model.flops_per_example(d.image_size) * d.batch_size

    # The loop's hooks -----------------------------------------------------------------------------

    def describe(self, state) -> str:
        n = sum(x.size for x in jax.tree.leaves(state.groups["dit"].params))
        d = self.config.data
        return (f"DiT-{self.config.model.name}: {n / 1e6:.2f}M parameters, "
                f"{self.model.paper_gflops(d.image_size):.2f} Gflops (the paper's count), "
                f"{d.image_size}x{d.image_size}x{self.model.in_channels} latents, "
                f"{self.model.num_classes} classes")

    def make_batch(self, host: dict) -> dict[str, jax.Array]:
        """A host batch -> a global batch: latents (or for a pixel-space run, pixels) of images, the
        first frame of clips; labels from config.data.label."""
        latent = np.asarray(host["latent"] if "latent" in host else host["video"])
        if latent.ndim == 5:  # clips [B, T, H, W, C]: images are their first frames
            latent = latent[:, 0]
        return self.global_batch({"latent": np.asarray(latent, np.float32),
                                  "label": np.asarray(host[self.config.data.label], np.int32)})

    def throughput(self, steps_per_s: float) -> dict[str, float]:
        return {"steps_per_s": steps_per_s,
                "images_per_s": steps_per_s * self.config.data.batch_size,
                "tflops_per_s": steps_per_s * self.train_flops_per_step() / 1e12}

    @functools.cached_property
    def _eval_loss(self):
        """(params, batch, t int [B], noise) -> mean hybrid loss, conditional (no label dropped)."""
        def loss(params, batch, t, noise):
            no_drop = jnp.zeros(t.shape, bool)
            return ddpm_loss(self.model, self.ddpm, params, {**batch, "t": t, "noise": noise,
                                                             "drop_labels": no_drop})
        return jax.jit(loss)

    def validation_scalars(self, state, batches) -> dict[str, float]:
        """Validation loss at fixed steps t (config.train.eval_timesteps) and fixed noise, EMA
        weights: comparable across steps and runs."""
        params = state.groups["dit"].inference_params
        rng = jax.random.key(self.config.seed + 2)
        scalars = {}
        with self.activate():
            for step in self.config.train.eval_timesteps:
                losses = []
                for batch in batches:
                    x0 = batch["latent"]
                    noise = jax.random.normal(rng, x0.shape, x0.dtype)
                    t = jnp.full((x0.shape[0],), step, jnp.int32)
                    losses.append(float(self._eval_loss(params, batch, t, noise)))
                scalars[f"val/loss_t{step}"] = float(np.mean(losses))
        scalars["val/loss"] = float(np.mean(list(scalars.values())))
        return scalars

    def make_sampler(self, *, steps: int, eta: float = 0.0, guidance: float = 1.0,
                     guided_channels: int | None = None):
        """Returns sample(params, labels int [B], rng) -> latents [B, H, W, C], jitted: DDIM with
        classifier-free guidance against the null class (`DDPM.ddim_sample`)."""
        d = self.config.data

        def sample(params, labels, rng):
            denoise = lambda x, t, cond: self.model.apply({"params": params}, x, t, *cond)
            rng_noise, rng_steps = jax.random.split(rng)
            noise = jax.random.normal(rng_noise, (labels.shape[0], d.image_size, d.image_size,
                                                  self.model.in_channels))
            keep = jnp.zeros(labels.shape, bool)
            return self.ddpm.ddim_sample(denoise, noise, (labels, keep), (labels, ~keep), rng=rng_steps,
                                         steps=steps, eta=eta, guidance_scale=guidance,
                                         guided_channels=guided_channels)

        jitted = jax.jit(sample)

        def run(params, labels, rng):
            with self.activate():
                return jitted(params, jnp.asarray(labels, jnp.int32), rng)

        return run

    def write_samples(self, state, step: int, workdir: str, batches) -> str:
        """Images of classes 0, 1, 2, ... (config.train.num_samples) with fixed noise. A pixel-space
        run (3 channels) writes them as a gif grid; a latent run saves the latents (.npy)."""
        del batches
        s = self.config.sampling
        labels = np.arange(self.config.train.num_samples) % self.model.num_classes
        sampler = self.make_sampler(steps=s.steps, eta=s.eta, guidance=s.guidance,
                                    guided_channels=s.get("guided_channels"))
        images = np.asarray(jax.device_get(sampler(state.groups["dit"].inference_params, labels,
                                                   jax.random.key(self.config.seed))))
        path = os.path.join(workdir, "samples", f"step_{step:06d}")
        if images.shape[-1] != 3:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            np.save(path + ".npy", images)
            return path + ".npy"
        from sora_jax.data.video_io import write_video
        return write_video(path + ".gif", to_uint8(images[:, None]))
