r"""Native sizes: the latent DiT trained on clips of many sizes at once, packed NaViT-style.

`moving_shapes/mixed_s16` keeps every clip at its own size: images (a quarter of the examples) and
videos of 5, 9, 13 or 17 frames, at 16x16, 16x32 (landscape) or 32x16 (portrait). The causal VAE of
configs/vae_moving_shapes.py encodes each clip at its size (latents of 1-5 frames of 4x4, 4x8 or
8x4), and `config.data.batching` turns them into fixed token budgets:

  pack     several clips per row of seq_len tokens, block-diagonal attention (the default)
  bucket   one size per batch, rows per batch from the token budget
  pad      one clip per row, padded to seq_len

The DiT is the default experiment's, with size conditioning (frames, fps, height, width, aspect).
Train the VAE first (see configs/moving_shapes.py), then encode the dataset once and train:

  python -m sora_jax.cache_latents --config=configs/moving_shapes_mixed.py
  python -m sora_jax.train --config=configs/moving_shapes_mixed.py --workdir=workdirs/moving_shapes_mixed
  python -m sora_jax.generate --workdir=workdirs/moving_shapes_mixed --frames=17 --height=16 \
      --width=32 --prompt="a red square slides left" --out=wide.mp4

A few real steps on the CPU (under a minute; any VAE workdir of the runlocal VAE config):

  python -m sora_jax.train --config=configs/moving_shapes_mixed.py:runlocal --workdir=/tmp/mixed \
      --config.autoencoder.workdir=/tmp/vae_local

Arguments (comma separated after the colon): `runlocal`; `pad` or `bucket` for that batching.
"""

import ml_collections

from configs import moving_shapes


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = set(filter(None, (arg or "").split(",")))
    unknown = args - {"runlocal", "pad", "bucket"}
    if unknown:
        raise ValueError(f"Unknown config arguments {sorted(unknown)}; valid: ['bucket', 'pad', "
                         "'runlocal'].")
    runlocal = "runlocal" in args
    config = moving_shapes.get_config("runlocal" if runlocal else None)
    batching = "pad" if "pad" in args else "bucket" if "bucket" in args else "pack"
    config.data.update(
        builder_config="tiny_mixed" if runlocal else "mixed_s16",
        # Latents of every clip at its own size, with its text embeddings (python -m
        # sora_jax.cache_latents --config=configs/moving_shapes_mixed.py); None encodes clips
        # as they are read, one VAE call per size of a host batch.
        latent_cache=None if runlocal else "workdirs/moving_shapes_mixed_latents",
        # Samples, and generate's default size: the default experiment's clips.
        frames=5 if runlocal else 9, height=16, width=16, fps=8.0,
        batching=batching,
        # Latent tokens a step, padding included, in rows of seq_len tokens; the rows of a step
        # must split evenly over the mesh's batch axes (8 rows here).
        tokens_per_batch=1024 if runlocal else 2048,
        # Tokens per row: at least the longest clip (17 frames at 16x32: 5 x 4 x 8 = 160 latent
        # tokens; tiny_mixed: 3 x 4 x 4 = 48), all 'pad' uses; a packed row holds a few clips.
        seq_len=(48 if runlocal else 160) if batching == "pad" else (128 if runlocal else 256),
        max_clips=8,  # clips per packed row: cross-attention sees every slot's caption
        max_slots=16,  # temporal positions per packed row: seq_len / 16 (a 4x4 latent frame)
        batch_size=32,  # clips read from the dataset at a time (per step: tokens_per_batch)
    )
    config.model.size_conditioning = True
    return config
