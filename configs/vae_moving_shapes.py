r"""The causal video VAE on `moving_shapes`: the compression network of the default experiment.

Clips of 9 frames at 16x16 map to latents of 3 x 4 x 4 x 4 (4x in time, 4x4 in space, 4 channels:
48x fewer values). The stem folds 2x2 pixel patches into channels, so no convolution runs at full
resolution on the CPU.

  python -m sora_jax.train --config=configs/vae_moving_shapes.py --workdir=workdirs/vae_moving_shapes
  python -m sora_jax.evaluate --workdir=workdirs/vae_moving_shapes     # PSNR / SSIM, held out

On 2 CPU cores: 4800 steps at ~8 steps/s, about 10 minutes; 28.9 dB PSNR on held-out clips
(experiments/moving_shapes.md).

A few real steps, to check that everything runs (under a minute):

  python -m sora_jax.train --config=configs/vae_moving_shapes.py:runlocal --workdir=/tmp/vae_local

Arguments (comma separated after the colon): `runlocal`, `adversarial` (adds the 3D patch
discriminator's hinge loss from step disc_start).
"""

import ml_collections
from ml_collections import config_dict

from sora_jax.parallel.mesh import DEFAULT_RULES


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = set(filter(None, (arg or "").split(",")))
    unknown = args - {"runlocal", "adversarial"}
    if unknown:
        raise ValueError(f"Unknown config arguments {sorted(unknown)}; valid: ['adversarial', "
                         "'runlocal'].")
    runlocal = "runlocal" in args

    config = ml_collections.ConfigDict()
    config.seed = 0
    config.task = "vae"

    config.data = dict(
        name="moving_shapes",
        builder_config="tiny" if runlocal else "f9_s16",
        data_dir=config_dict.placeholder(str),
        frames=5 if runlocal else 9,
        height=16,
        width=16,
        batch_size=8,  # more, smaller steps beat batch 16 in the same time (experiments/)
        worker_count=0,
        train_split="train",
        validation_split="validation",
        eval_split="test",
    )

    config.vae = dict(
        latent_channels=4,
        temporal_compression=4,
        spatial_compression=4,
        patch_size=2,
        widths=(8, 16, 16) if runlocal else (16, 32, 64),
        num_blocks=1,
        mid_attention=False,
        num_groups=8,
        # bf16 convolutions with f32 norms and losses; on TPU/GPU as on CPU.
        dtype="bfloat16",
    )
    config.loss = dict(
        pixel="l2",  # PSNR is an L2 measure; L1 stalled at ~15 dB (experiments/)
        kl_weight=1e-6,
        disc_weight=0.5 if "adversarial" in args else 0.0,
        disc_start=2 if runlocal else 1000,
    )
    config.discriminator = dict(widths=(16, 32) if runlocal else (32, 64, 128), learning_rate=2e-4)

    config.optim = dict(
        learning_rate=2e-3,
        warmup_steps=5 if runlocal else 100,
        decay="cosine",
        end_fraction=0.05,
        weight_decay=0.0,
        b1=0.9,
        b2=0.99,
        grad_clip=1.0,
        grad_accum_steps=1,
        ema_decay=0.0,
    )

    config.train = dict(
        num_steps=4 if runlocal else 4800,
        log_every=2 if runlocal else 50,
        eval_every=2 if runlocal else 1200,
        sample_every=4 if runlocal else 4800,
        checkpoint_every=2 if runlocal else 1200,
        max_to_keep=2,
        num_eval_batches=1 if runlocal else 4,
        num_samples=4,
    )
    config.eval = dict(num_videos=16 if runlocal else 256, batch_size=8 if runlocal else 64)

    config.mesh = dict(data=-1, fsdp=1, tensor=1, sequence=1)
    config.sharding_rules = [list(rule) for rule in DEFAULT_RULES]
    return config
