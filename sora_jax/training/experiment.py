"""From a config to the objects of an experiment: model, objective, mesh, shardings, state.

Training, generation, evaluation and the benchmarks all build their pieces here, so a config means
the same thing to each of them. Nothing here runs a training step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sora_jax import paths
from sora_jax.data import batching as batching_lib
from sora_jax.data import latent_cache as latent_cache_lib
from sora_jax.data import packing as packing_lib
from sora_jax.diffusion import masks as masks_lib
from sora_jax.diffusion.flow import RectifiedFlow
from sora_jax.diffusion import sampling as sampling_lib
from sora_jax.diffusion.sampling import Guidance, euler_sample
from sora_jax.models import patch as patch_lib
from sora_jax.models import text as text_lib
from sora_jax.models.dit import DiT
from sora_jax.models.patch import grid_size
from sora_jax.training import autoencoders as autoencoder_lib
from sora_jax.parallel import context as context_lib
from sora_jax.parallel import mesh as mesh_lib
from sora_jax.parallel import vae_sharding
from sora_jax.training import state as state_lib
from sora_jax.training.step import (make_eval_step, make_packed_eval_step,
                                    make_packed_train_step, make_train_step)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
DEFAULT_FPS = 8.0  # size conditioning's frame rate where the data gives none


def validate_common(config: ml_collections.ConfigDict) -> None:
    """Checks shared by every task: training schedule, batch and sharding rules."""
    data, optim = config.data, config.optim
    for name in ("num_steps", "log_every", "eval_every", "sample_every", "checkpoint_every"):
        if config.train[name] <= 0:
            raise ValueError(f"config.train.{name} must be positive, got {config.train[name]}.")
    if data.batch_size % optim.grad_accum_steps:
        raise ValueError(f"config.data.batch_size={data.batch_size} is not divisible by "
                         f"config.optim.grad_accum_steps={optim.grad_accum_steps}.")
    mesh_lib.rules_from_config(config.sharding_rules)


def validate(config: ml_collections.ConfigDict) -> None:
    """Fails early, naming the setting and the fix, for values that are inconsistent together."""
    validate_common(config)
    data, model = config.data, config.model
    try:
        masks_lib.check_mask_weights(config.train.get("masks"))
    except ValueError as e:
        raise ValueError(f"config.train.masks: {e}") from None
    if model.dtype not in DTYPES:
        raise ValueError(f"config.model.dtype={model.dtype!r}; valid: {sorted(DTYPES)}.")
    if model.width % model.num_heads:
        raise ValueError(f"config.model.width={model.width} is not divisible by "
                         f"config.model.num_heads={model.num_heads}.")
    if (model.width // model.num_heads) % 2:
        raise ValueError(f"Head dim {model.width // model.num_heads} must be even for RoPE; "
                         "change config.model.width or num_heads.")
    context_parallel = model.get("context_parallel", "none")
    if context_parallel not in context_lib.METHODS:
        raise ValueError(f"config.model.context_parallel={context_parallel!r}; valid: "
                         f"{', '.join(map(repr, context_lib.METHODS))}.")
    sequence = config.mesh.get("sequence", 1)
    if context_parallel == "ulysses" and sequence > 1 and model.num_heads % sequence:
        raise ValueError(f"config.model.context_parallel='ulysses' splits the heads over the sequence "
                         f"axis, but config.model.num_heads={model.num_heads} is not divisible by "
                         f"config.mesh.sequence={sequence}; use 'ring' or change either.")
    if not 0.0 <= config.text.caption_dropout < 1.0:
        raise ValueError(f"config.text.caption_dropout must be in [0, 1), got {config.text.caption_dropout}.")
    if config.sampling.get("rope", "extrapolate") not in ("extrapolate", "interpolate"):
        raise ValueError(f"config.sampling.rope={config.sampling.rope!r}; valid: 'extrapolate', "
                         "'interpolate'.")
    if config.text.get("dtype", "float32") not in DTYPES:
        raise ValueError(f"config.text.dtype={config.text.dtype!r}; valid: {sorted(DTYPES)}.")
    autoencoder = autoencoder_lib.declared_autoencoder(config.autoencoder)
    over = config.autoencoder.get("shard_over")
    if over is not None and over not in vae_sharding.OVER:
        raise ValueError(f"config.autoencoder.shard_over={over!r}; valid: "
                         f"{', '.join(vae_sharding.OVER)}, or None to run it whole.")
    if over is not None and config.autoencoder.kind != "causal_vae":
        raise ValueError("config.autoencoder.shard_over splits the causal VAE (kind "
                         f"'causal_vae'), not kind {config.autoencoder.kind!r}; leave it None.")
    patch_lib.check_tileable(data.frames, data.height, data.width, tuple(model.patch_size),
                             autoencoder.temporal_compression, autoencoder.spatial_compression)
    if (config.train.get("masks") or {}).get("end_image"):
        if data.get("batching") or model.patch_size[0] != 1:
            raise ValueError(
                "config.train.masks.end_image replaces a clip's last latent frame by its end image: "
                "it needs clips of one size (config.data.batching unset) and a temporal patch of "
                f"1; got batching={data.get('batching')!r}, patch_size={tuple(model.patch_size)}. "
                "Set its weight to 0 or change these.")
    RectifiedFlow(**config.diffusion)
    settings = guidance_settings(config.sampling)
    try:
        Guidance(settings["guidance"], settings["guidance_rescale"], settings["guidance_interval"])
    except ValueError as error:
        raise ValueError(f"config.sampling: {error}") from None
    pixel = settings["pixel_guidance"]
    if isinstance(pixel, bool) or not isinstance(pixel, (int, float)) or not pixel >= 0:
        raise ValueError(f"config.sampling.pixel_guidance={pixel!r}: give a step size >= 0 (0 turns "
                         "pixel guidance of image and video prompts off).")


def guidance_settings(sampling: ml_collections.ConfigDict, **overrides) -> dict[str, Any]:
    """`make_sampler`'s guidance keywords from config.sampling, replaced by the overrides that are
    not None. Workdirs saved before guidance_rescale, guidance_interval and pixel_guidance existed
    get plain CFG and no pixel guidance."""
    settings = dict(guidance=sampling.guidance,
                    guidance_rescale=sampling.get("guidance_rescale", 0.0),
                    guidance_interval=sampling.get("guidance_interval", (0.0, 1.0)),
                    pixel_guidance=sampling.get("pixel_guidance", 0.0))
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return settings


def at_sample_size(config: ml_collections.ConfigDict, *, frames: int | None = None,
                   height: int | None = None, width: int | None = None,
                   rope: str | None = None) -> ml_collections.ConfigDict:
    """A trained workdir's config set to sample at another size (None keeps the training one).

    The training size becomes config.sampling.rope_reference (unless the config declares one), the
    range `rope='interpolate'` compresses larger grids into; see `Experiment._rope_scale`.
    """
    config = ml_collections.ConfigDict(config.to_dict())
    data = config.data
    if not config.sampling.get("rope_reference"):
        config.sampling.rope_reference = (data.frames, data.height, data.width)
    if rope is not None:
        config.sampling.rope = rope
    data.frames, data.height, data.width = frames or data.frames, height or data.height, \
        width or data.width
    return config


def text_identity(text: ml_collections.ConfigDict) -> dict[str, Any]:
    """What determines a config's text embeddings: the key under which they are cached."""
    path = text.get("path")
    return {"encoder": text.encoder, "path": os.fspath(paths.path(path)) if path else None,
            "dtype": text.get("dtype", "float32"), "max_length": text.max_length}


def text_dim(text: ml_collections.ConfigDict) -> int:
    """The text encoder's token width: config.text.dim where declared (checked against the
    checkpoint when it loads), else read from the encoder's config without loading weights."""
    if text.get("dim"):
        return text.dim
    return text_lib.encoder_dim(text.encoder, path=text.get("path"))


class ExperimentBase:
    """What every task's experiment has: mesh, logical rules, optimizer, and a TrainState built
    from `_init_boxed` (the subclass's parameter initialisation, with logical names)."""

    config: ml_collections.ConfigDict

    def _setup_common(self, devices) -> None:
        c = self.config
        self.rules = mesh_lib.rules_from_config(c.sharding_rules)
        self.mesh = mesh_lib.make_mesh(dict(c.mesh), devices)
        batch_ways = mesh_lib.batch_axis_size(self.mesh, self.rules)
        if c.data.batch_size % batch_ways:
            raise ValueError(f"config.data.batch_size={c.data.batch_size} must be a multiple of the "
                             f"{batch_ways} ways the mesh {dict(self.mesh.shape)} splits the batch.")
        self.schedule = state_lib.learning_rate_schedule(
            learning_rate=c.optim.learning_rate, warmup_steps=c.optim.warmup_steps,
            total_steps=c.train.num_steps, decay=c.optim.decay, end_fraction=c.optim.end_fraction)
        self.tx = state_lib.adamw(self.schedule, b1=c.optim.b1, b2=c.optim.b2,
                                  weight_decay=c.optim.weight_decay, grad_clip=c.optim.grad_clip)

    @contextlib.contextmanager
    def activate(self):
        """The mesh and logical-axis rules under which the model's steps are traced."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    def batch_shardings(self, batch: dict) -> dict:
        return {k: mesh_lib.batch_sharding(self.mesh, self.rules, v.ndim) for k, v in batch.items()}

    def host_rows(self) -> tuple[int, ...]:
        """The rows of each global batch (config.data.batch_size) that this process feeds: those
        its devices hold under the batch sharding, in increasing order, the order in which
        `global_batch` places a host's rows. The loader reads exactly these rows of the batch a
        one-process run would read (`pipeline.GlobalBatchSampler`)."""
        size = self.config.data.batch_size
        sharding = mesh_lib.batch_sharding(self.mesh, self.rules, 1)
        rows = set()
        for index in sharding.addressable_devices_indices_map((size,)).values():
            rows.update(range(size)[index[0]])
        return tuple(sorted(rows))

    def global_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Host-local numpy arrays -> global arrays sharded over the batch axes (multi-host safe):
        a host's rows land in its devices' rows of the global batch (`host_rows`)."""
        return {k: jax.make_array_from_process_local_data(
                    mesh_lib.batch_sharding(self.mesh, self.rules, np.ndim(v)), v)
                for k, v in local.items()}

    def _init_boxed(self, rng: jax.Array) -> state_lib.TrainState:
        raise NotImplementedError

    def make_batch(self, host: dict) -> dict[str, jax.Array]:
        raise NotImplementedError

    def train_batches(self, host_batches: Iterator) -> Iterator[dict[str, jax.Array]]:
        """Device batches from the loader's host batches (one each, unless overridden)."""
        return (self.make_batch(host) for host in host_batches)

    @functools.cached_property
    def state_shardings(self) -> Any:
        """NamedShardings of the TrainState, from the logical names its parameters carry."""
        with nn.logical_axis_rules(self.rules):
            abstract = jax.eval_shape(self._init_boxed, jax.random.key(0))
            specs = nn.get_partition_spec(abstract)
        return mesh_lib.logical_to_sharding(specs, self.mesh, self.rules)

    def abstract_state(self) -> state_lib.TrainState:
        """ShapeDtypeStructs of the state carrying its shardings (a restore target)."""
        with nn.logical_axis_rules(self.rules):
            abstract = nn.meta.unbox(jax.eval_shape(self._init_boxed, jax.random.key(0)))
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, self.state_shardings)

    def init_state(self, rng: jax.Array) -> state_lib.TrainState:
        """A freshly initialised state, created directly in its sharded layout."""
        # No mesh in context: flax's DenseGeneral would constrain its flattened kernel with the
        # full-rank spec. out_shardings alone places every array.
        init = lambda r: nn.meta.unbox(self._init_boxed(r))
        with nn.logical_axis_rules(self.rules):
            return jax.jit(init, out_shardings=self.state_shardings)(rng)

    def jit_step(self, step, batch_shapes: dict, *, donate: bool = True):
        """step(state, batch, rng) -> (state, metrics), jitted with this mesh's shardings."""
        replicated = mesh_lib.replicated(self.mesh)
        return jax.jit(step,
                       in_shardings=(self.state_shardings, self.batch_shardings(batch_shapes),
                                     replicated),
                       out_shardings=(self.state_shardings, replicated),
                       donate_argnums=(0,) if donate else ())

    def checkpoint_items(self, state, batches) -> dict[str, dict]:
        """JSON items saved beside the state in each checkpoint (none by default)."""
        del state, batches
        return {}


@dataclasses.dataclass
class Experiment(ExperimentBase):
    """A text-to-video DiT experiment, built from its config on the current devices.

    The autoencoder's architecture comes from the config; its weights (for a trained VAE, from the
    workdir the config names) load on first use, so shapes and shardings need no checkpoint.
    """

    config: ml_collections.ConfigDict
    devices: Any = None

    def __post_init__(self):
        validate(self.config)
        c = self.config
        self._setup_common(self.devices)
        self.autoencoder = autoencoder_lib.declared_autoencoder(c.autoencoder)
        self.flow = RectifiedFlow(**c.diffusion)
        self.temporal_patch = c.model.patch_size[0]
        self.latent_shape = self.autoencoder.latent_shape(c.data.frames, c.data.height, c.data.width)
        self.model = DiT(
            in_channels=self.latent_shape[-1],
            patch_size=tuple(c.model.patch_size),
            width=c.model.width,
            depth=c.model.depth,
            num_heads=c.model.num_heads,
            text_dim=text_dim(c.text),
            mlp_ratio=c.model.mlp_ratio,
            qk_norm=c.model.qk_norm,
            dtype=DTYPES[c.model.dtype],
            matmul=c.model.matmul,
            attention_backend=c.model.attention_backend,
            context_parallel=c.model.get("context_parallel", "none"),
            scan_layers=c.model.scan_layers,
            remat_policy=c.model.remat_policy,
            size_conditioning=c.model.get("size_conditioning", False),
            rope_scale=self._rope_scale(),
        )
        self.batcher = self._make_batcher() if c.data.get("batching") else None
        # How encoding and decoding split a clip over the mesh's `sequence` axis
        # (config.autoencoder.shard_over: 'frames' or 'height', parallel/vae_sharding.py); None
        # runs the autoencoder whole on every device of that axis (the default, and always on a
        # `sequence` axis of one device).
        over = c.autoencoder.get("shard_over")
        self.vae_split = over if self.mesh.shape["sequence"] > 1 else None
        # Trained with end_image masks (diffusion/masks.py): clips carry end images.
        self.end_image = bool((c.train.get("masks") or {}).get("end_image"))

    @property
    def end_frame(self) -> int | None:
        """The pixel frame whose lone encoding is a training clip's end image: the frame at which
        its second-last latent frame ends; None without end_image masks."""
        if not self.end_image:
            return None
        n = self.latent_shape[0]
        if n < 3:
            raise ValueError(f"config.train.masks.end_image needs clips of at least 3 latent frames "
                             f"(a given first, one generated, the end image); these "
                             f"{self.config.data.frames}-frame clips have {n}. Set its weight to 0 "
                             "or train on longer clips.")
        return getattr(self.autoencoder, "temporal_compression", 1) * (n - 2)

    def _rope_scale(self) -> tuple[float, float, float]:
        """RoPE position factors for the config's clip size (see `DiT.rope_scale`).

        config.sampling.rope='extrapolate' (the default) keeps positions as they are at any size;
        'interpolate' compresses each axis longer than config.sampling.rope_reference's (the
        largest (frames, height, width) trained on; generate and evaluate set it to the training
        size) into the trained range. Sizes within the reference are never scaled.
        """
        c = self.config
        mode = c.sampling.get("rope", "extrapolate")
        if mode == "extrapolate":
            return (1.0, 1.0, 1.0)
        reference = c.sampling.get("rope_reference") or (c.data.frames, c.data.height, c.data.width)
        trained = grid_size(self.autoencoder.latent_shape(*reference)[:3], c.model.patch_size)
        grid = grid_size(self.latent_shape[:3], c.model.patch_size)
        return tuple(min(1.0, r / g) for r, g in zip(trained, grid))

    def _make_batcher(self) -> batching_lib.Batcher:
        """Packed batches of clips of many sizes, config.data.tokens_per_batch tokens a step."""
        c, processes = self.config, jax.process_count()
        if c.data.batching == "bucket" and processes > 1:
            # Each host would fill its buckets in its own order: batch shapes would disagree.
            raise ValueError("config.data.batching='bucket' runs on one host; on several, use "
                             "'pack' (one batch shape on every host).")
        ways = mesh_lib.batch_axis_size(self.mesh, self.rules)
        return batching_lib.Batcher(
            c.data.batching, tokens_per_batch=c.data.tokens_per_batch // processes,
            seq_len=c.data.seq_len, max_clips=c.data.max_clips if c.data.batching == "pack" else 1,
            max_slots=c.data.max_slots, patch_size=tuple(c.model.patch_size),
            text_len=c.text.max_length, row_multiple=max(1, ways // processes))

    @functools.cached_property
    def loaded_autoencoder(self) -> tuple[Any, Any]:
        """(autoencoder, weights) from the workdir the config names, loaded on first use."""
        autoencoder, params = autoencoder_lib.load_declared(self.config.autoencoder,
                                                            self.autoencoder)
        # Replicated over this experiment's mesh: encoding and decoding run beside the DiT.
        return autoencoder, jax.device_put(params, mesh_lib.replicated(self.mesh))

    # Shapes -----------------------------------------------------------------------------------

    def batch_shapes(self, batch_size: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
        """Global shapes of a training batch."""
        b = self.config.data.batch_size if batch_size is None else batch_size
        text_len, text_dim = self.config.text.max_length, self.model.text_dim
        if self.batcher is not None:
            return self._packed_shapes(text_len, text_dim)
        shapes = {
            "latent": jax.ShapeDtypeStruct((b, *self.latent_shape), jnp.float32),
            "text": jax.ShapeDtypeStruct((b, text_len, text_dim), jnp.float32),
            "text_mask": jax.ShapeDtypeStruct((b, text_len), jnp.bool_),
        }
        if self.end_image:
            shapes["end_latent"] = jax.ShapeDtypeStruct((b, 1, *self.latent_shape[1:]), jnp.float32)
        return shapes

    def _packed_shapes(self, text_len: int, text_dim: int) -> dict[str, jax.ShapeDtypeStruct]:
        """Global shapes of a packed batch of rows of seq_len tokens (`data.packing.pack`)."""
        d, b = self.config.data, self.batcher
        rows, length, clips = b.rows(b.seq_len) * jax.process_count(), b.seq_len, b.max_clips
        patch_dim = math.prod(b.patch_size) * self.latent_shape[-1]
        shape = lambda *s, dtype=jnp.int32: jax.ShapeDtypeStruct(s, dtype)
        return {
            "tokens": shape(rows, length, patch_dim, dtype=jnp.float32),
            "segment_ids": shape(rows, length),
            "positions": shape(rows, length, 3),
            "slot": shape(rows, length),
            "slot_clip": shape(rows, d.max_slots),
            "text": shape(rows, clips, text_len, text_dim, dtype=jnp.float32),
            "text_mask": shape(rows, clips, text_len, dtype=jnp.bool_),
            "sizes": shape(rows, clips, len(packing_lib.SIZE_FIELDS), dtype=jnp.float32),
        }

    def tokens_per_example(self) -> int:
        t, h, w, _ = self.latent_shape
        pt, ph, pw = self.config.model.patch_size
        return (t // pt) * (h // ph) * (w // pw)

    def train_flops_per_step(self) -> float | None:
        """Model FLOPs of one training step: forward + backward (3x forward) over the global batch;
        None for batches of many sizes, whose FLOPs vary."""
        if self.batcher is not None:
            return None
        forward = self.model.flops_per_example(self.latent_shape[:3], self.config.text.max_length)
        return 3.0 * forward * self.config.data.batch_size

    # State ------------------------------------------------------------------------------------

    def _init_boxed(self, rng: jax.Array) -> state_lib.TrainState:
        text_len = self.config.text.max_length
        latent = jnp.zeros((1, *self.latent_shape))
        t = jnp.zeros((1, self.latent_shape[0] // self.temporal_patch))
        text, mask = jnp.zeros((1, text_len, self.model.text_dim)), jnp.ones((1, text_len), bool)
        sizes = self.sample_sizes(1) if self.model.size_conditioning else None
        params = self.model.init(rng, latent, t, text, mask, sizes=sizes)["params"]
        group = state_lib.Group.create(params, self.tx, self.config.optim.ema_decay)
        return state_lib.TrainState(step=jnp.zeros((), jnp.int32), groups={"dit": group})

    # Steps ------------------------------------------------------------------------------------

    def jit_train_step(self, *, donate: bool = True, caption_dropout: float | None = None,
                       grad_accum_steps: int | None = None):
        """train_step(state, batch, rng) -> (state, metrics), jitted with this mesh's shardings."""
        c = self.config
        kw = dict(tx=self.tx, schedule=self.schedule, ema_decay=c.optim.ema_decay,
                  caption_dropout=c.text.caption_dropout if caption_dropout is None else caption_dropout,
                  grad_accum_steps=grad_accum_steps or c.optim.grad_accum_steps,
                  mask_weights=masks_lib.check_mask_weights(c.train.get("masks")))
        _ = self.end_frame  # refuses clips too short to hold an end image, naming the fix
        if self.batcher is not None:
            step = make_packed_train_step(self.model, self.flow, **kw)
        else:
            step = make_train_step(self.model, self.flow, temporal_patch=self.temporal_patch, **kw)
        return self.jit_step(step, self.batch_shapes(), donate=donate)

    def sample_sizes(self, batch: int) -> jax.Array:
        """Size conditioning [batch, 5] of the config's clip size (what samples are made at)."""
        d = self.config.data
        features = packing_lib.size_features(d.frames, d.get("fps", DEFAULT_FPS), d.height, d.width)
        return jnp.tile(jnp.asarray(features)[None], (batch, 1))

    def autoencoder_call(self, method: str):
        """`method` ('encode' or 'decode') of the loaded autoencoder as f(params, x), split over
        the mesh's `sequence` axis as `vae_split` says (the batch over the mesh's batch axes
        where it divides evenly, else whole on each)."""
        autoencoder = self.loaded_autoencoder[0]
        if self.vae_split is None:
            return getattr(autoencoder, method)
        split = {"encode": vae_sharding.sharded_encode,
                 "decode": vae_sharding.sharded_decode}[method]
        batch_axes = mesh_lib.batch_axes(self.rules)
        ways = mesh_lib.batch_axis_size(self.mesh, self.rules)

        def call(params, x):
            return split(autoencoder, params, x, self.mesh, over=self.vae_split,
                         batch_axes=batch_axes if x.shape[0] % ways == 0 else ())

        return call

    @functools.cached_property
    def _encode(self):
        return jax.jit(self.autoencoder_call("encode"))

    def encode_video(self, video: np.ndarray) -> np.ndarray:
        """Pixels [B, T, H, W, 3] in [-1, 1] -> the latents the DiT is trained on."""
        return np.asarray(self._encode(self.loaded_autoencoder[1], video))

    # The loop's hooks -----------------------------------------------------------------------------

    def describe(self, state) -> str:
        n = sum(x.size for x in jax.tree.leaves(state.groups["dit"].params))
        if self.batcher is not None:
            b = self.batcher
            return (f"DiT: {n / 1e6:.2f}M parameters, clips of many sizes batched by "
                    f"{b.batching!r}, {self.config.data.tokens_per_batch} tokens a step "
                    f"({b.seq_len} a row)")
        return (f"DiT: {n / 1e6:.2f}M parameters, {self.tokens_per_example()} tokens per example, "
                f"latents {self.latent_shape}")

    @functools.cached_property
    def _cached_text_encoder(self):
        """captions -> memoised (tokens, mask) numpy embeddings, encoded on `_text_mesh`."""
        from sora_jax.training.text_cache import CachedTextEncoder
        cached = CachedTextEncoder(self.text_encoder)

        def encode(captions):
            with jax.set_mesh(self._text_mesh):
                return cached(captions)
        return encode

    def make_batch(self, host: dict) -> dict[str, jax.Array]:
        """A host batch of the pipeline (pixels or cached latents, captions) -> a global batch."""
        if "text" in host:  # latent cache with precomputed text embeddings
            text, mask = host["text"], host["text_mask"]
        else:
            text, mask = self._cached_text_encoder(list(host["caption"]))
        latent = host["latent"] if "latent" in host else self.encode_video(host["video"])
        batch = {"latent": latent, "text": text, "text_mask": mask}
        if self.end_image:
            if "end_latent" in host:
                batch["end_latent"] = host["end_latent"]
            elif "video" in host:
                end = self.end_frame
                batch["end_latent"] = self.encode_video(host["video"][:, end:end + 1])
            else:
                raise ValueError("config.train.masks.end_image needs end images, and the latent "
                                 "cache has none: rebuild it with this config.")
        return self.global_batch(batch)

    def train_batches(self, host_batches: Iterator) -> Iterator[dict[str, jax.Array]]:
        """Device batches from host batches: as they are, or for clips of many sizes (lists of
        examples) encoded one by one and batched by `self.batcher` (padded, bucketed or packed)."""
        if self.batcher is None:
            yield from super().train_batches(host_batches)
            return
        for packed in self.batcher(self._clips(host_batches)):
            yield self.global_batch({k: packed[k] for k in self.batch_shapes()})

    def _clips(self, host_batches: Iterator[list[dict]]) -> Iterator[dict[str, Any]]:
        """Clips for the batcher: from the latent cache as stored, or from pixels encoded here (one
        VAE call per size of a host batch) with their captions' embeddings."""
        for examples in host_batches:
            if "latent" in examples[0]:
                latents = [e["latent"] for e in examples]
            else:
                latents = latent_cache_lib.encode_by_size([e["video"] for e in examples],
                                                          self.encode_video)
            if "text" in examples[0]:
                text, mask = [e["text"] for e in examples], [e["text_mask"] for e in examples]
            else:
                text, mask = self._cached_text_encoder([e["caption"] for e in examples])
            for example, latent, tokens, valid in zip(examples, latents, text, mask):
                yield {"latent": latent, "text": tokens, "text_mask": valid,
                       "fps": example.get("fps", DEFAULT_FPS),
                       **{k: example[k] for k in ("frames", "height", "width")}}

    def cache_latent_shape(self) -> tuple[int | None, ...]:
        """What `latent_cache.check_matches` expects of this config's cache: one clip's latent
        shape, or (None, None, None, channels) for clips of many sizes."""
        if self.batcher is not None:
            return (None, None, None, self.latent_shape[-1])
        return tuple(self.latent_shape)

    def throughput(self, steps_per_s: float) -> dict[str, float]:
        if self.batcher is not None:  # every position; packing_efficiency says how many are clips
            return {"steps_per_s": steps_per_s,
                    "tokens_per_s": steps_per_s * self.config.data.tokens_per_batch}
        return {"steps_per_s": steps_per_s,
                "tokens_per_s": steps_per_s * self.config.data.batch_size * self.tokens_per_example(),
                "tflops_per_s": steps_per_s * self.train_flops_per_step() / 1e12}

    @functools.cached_property
    def _eval_step(self):
        time_bins = tuple(self.config.train.time_bins)
        if self.batcher is not None:
            step = make_packed_eval_step(self.model, self.flow, time_bins=time_bins)
        else:
            step = make_eval_step(self.model, self.flow, time_bins=time_bins,
                                  temporal_patch=self.temporal_patch)
        # Replicated losses: every process reads them, as on several it must.
        return jax.jit(step, out_shardings=mesh_lib.replicated(self.mesh))

    def validation_scalars(self, state, batches) -> dict[str, float]:
        """Validation loss per diffusion-time bin (fixed noise: comparable across steps and runs)."""
        rng = jax.random.key(self.config.seed + 2)
        with self.activate():
            per_bin = np.mean([np.asarray(self._eval_step(state, b, rng)) for b in batches], axis=0)
        scalars = {f"val/loss_t{t:.1f}": float(v) for t, v in zip(self.config.train.time_bins, per_bin)}
        scalars["val/loss"] = float(np.mean(per_bin))
        return scalars

    @functools.cached_property
    def _sample_prompts(self) -> list[str]:
        from sora_jax.data import pipeline
        return [p["caption"] for p in pipeline.eval_prompts(
            **pipeline.data_kwargs(self.config.data), split=self.config.data.eval_split,
            num=self.config.train.num_samples)]

    @functools.cached_property
    def _training_sampler(self):
        return self.make_sampler(steps=self.config.sampling.steps,
                                 **guidance_settings(self.config.sampling))

    def write_samples(self, state, step: int, workdir: str, batches) -> str:
        """Videos for fixed prompts from the config's evaluation split, with fixed noise."""
        del batches
        from sora_jax.data.video_io import write_video
        text, mask = self._cached_text_encoder(self._sample_prompts)
        video = self._training_sampler(state.groups["dit"].inference_params, text, mask,
                                       jax.random.key(self.config.seed))
        if jax.process_index() != 0:  # every process takes part in sampling; one writes
            return "written by process 0"
        path = write_video(os.path.join(workdir, "samples", f"step_{step:06d}.gif"),
                           to_uint8(jax.device_get(video)))
        return f"{path} ({' | '.join(self._sample_prompts)})"

    # Text -------------------------------------------------------------------------------------

    @functools.cached_property
    def _text_mesh(self) -> jax.sharding.Mesh:
        """This experiment's mesh; on several processes, this process's devices alone: each
        process encodes its own captions, which a mesh over all processes cannot take."""
        if jax.process_count() == 1:
            return self.mesh
        return mesh_lib.make_mesh({"fsdp": -1}, jax.local_devices())

    @functools.cached_property
    def text_encoder(self) -> text_lib.TextEncoder:
        """The frozen text encoder, its parameters sharded over `_text_mesh`."""
        return self.make_text_encoder(self._text_mesh)

    def make_text_encoder(self, mesh: jax.sharding.Mesh) -> text_lib.TextEncoder:
        """Loads the config's text encoder with its parameters sharded over `mesh` by the
        config's logical-axis rules (a T5-XXL does not fit one accelerator)."""
        t = self.config.text
        encoder = text_lib.get_text_encoder(t.encoder, max_length=t.max_length, path=t.get("path"),
                                            dtype=t.get("dtype", "float32"), mesh=mesh,
                                            rules=self.rules)
        if encoder.dim != self.model.text_dim:
            raise ValueError(f"The text encoder {t.encoder} ({t.get('path')}) makes "
                             f"{encoder.dim}-wide tokens but config.text.dim={t.dim}; set "
                             f"config.text.dim={encoder.dim} (or leave it unset to read it).")
        return encoder

    # Sampling ---------------------------------------------------------------------------------

    def make_sampler(self, *, steps: int, guidance: float, guidance_rescale: float = 0.0,
                     guidance_interval: tuple[float, float] = (0.0, 1.0), latent_shape=None,
                     pixel_guidance: float = 0.0):
        """Returns sample(params, text, text_mask, rng, negative_text=None, negative_mask=None, *,
        given=None, given_mask=None, init=None, start=0) -> video float32 [B, T, H, W, 3] in
        [-1, 1].

        Guidance (scale, rescale, interval: `sampling.Guidance`) contrasts each caption with the
        learned null caption, or with its own row of a negative prompt's `negative_text`
        [B, L, D] and `negative_mask` [B, L] (shaped as text and text_mask) when given.
        Given latent frames (`given` [B, t, h, w, c] with `given_mask` [B, t // pt]) are kept clean
        while the rest is sampled; `init` latents with a `start` step make SDEdit
        (`sampling.euler_sample`). With `pixels` [B, T, H, W, 3] and `pixel_weight` [B, T] (> 0
        at given pixel frames) and a positive `pixel_guidance` scale, each step also pulls the
        decoded clean estimate toward the given pixels (`sampling.pixel_guidance`). The Euler loop
        and the decoder are one jit: it compiles once per batch shape and set of inputs.
        """
        shape = tuple(latent_shape or self.latent_shape)
        settings = Guidance(guidance, guidance_rescale, guidance_interval)
        if not pixel_guidance >= 0:
            raise ValueError(f"pixel_guidance must be >= 0 (0 is off), got {pixel_guidance}.")

        def sample(params, autoencoder_params, text, text_mask, rng, negative, given, init, start,
                   pixels):
            denoise = lambda x, t, cond: self.model.apply({"params": params}, x, t, *cond)
            own = jnp.zeros((text.shape[0],), bool)  # drop_text: each row sees its own caption
            # The DiT's size conditioning, where it has one: the size being sampled.
            sizes = (self.sample_sizes(text.shape[0]),) if self.model.size_conditioning else ()
            cond = (text, text_mask, own, *sizes)
            uncond = (text, text_mask, ~own, *sizes) if negative is None else (*negative, own, *sizes)
            noise = jax.random.normal(rng, (text.shape[0], *shape), jnp.float32)
            correct = None
            if pixels is not None and pixel_guidance > 0:
                correct = sampling_lib.pixel_guidance(
                    lambda z: decode(autoencoder_params, z), *pixels, pixel_guidance)
            latent = euler_sample(self.flow, denoise, noise, cond, uncond, steps=steps,
                                  guidance=settings, temporal_patch=self.temporal_patch,
                                  **(given or {}), init=init, start=start, correct=correct)
            return jnp.clip(decode(autoencoder_params, latent), -1.0, 1.0)

        def run(params, text, text_mask, rng, negative_text=None, negative_mask=None, *,
                given=None, given_mask=None, init=None, start=0, pixels=None, pixel_weight=None):
            if (negative_text is None) != (negative_mask is None):
                raise ValueError("Give negative_text and negative_mask together, or neither.")
            if (given is None) != (given_mask is None):
                raise ValueError("Give given and given_mask together, or neither.")
            negative = None if negative_text is None else (negative_text, negative_mask)
            if (pixels is None) != (pixel_weight is None):
                raise ValueError("Give pixels and pixel_weight together, or neither.")
            given = None if given is None else dict(given=given, given_mask=given_mask)
            pixels = None if pixels is None else (pixels, pixel_weight)
            with self.activate():
                return jitted(params, autoencoder_params, text, text_mask, rng, negative, given,
                              init, jnp.int32(start), pixels)

        autoencoder_params = self.loaded_autoencoder[1]
        decode = self.autoencoder_call("decode")
        # Replicated videos: every process can read them (on several, device_get needs that).
        jitted = jax.jit(sample, out_shardings=mesh_lib.replicated(self.mesh))
        return run


def get_experiment(config: ml_collections.ConfigDict, devices: Any = None):
    """The experiment for `config.task`: 'text_to_video' (DiT), 'vae' (video autoencoder) or
    'class_dit' (the DiT paper's class-conditional image model)."""
    task = config.get("task")
    if task == "text_to_video":
        return Experiment(config, devices)
    if task == "vae":
        from sora_jax.training.vae_experiment import VAEExperiment
        return VAEExperiment(config, devices)
    if task == "class_dit":
        from sora_jax.training.class_experiment import ClassExperiment
        return ClassExperiment(config, devices)
    raise ValueError(f"Unknown config.task {task!r}; valid: 'text_to_video', 'vae', 'class_dit'.")


def to_uint8(video: jax.Array | np.ndarray) -> np.ndarray:
    """[-1, 1] floats to uint8 pixels."""
    return np.asarray(np.clip((np.asarray(video) + 1.0) * 127.5 + 0.5, 0, 255), np.uint8)
