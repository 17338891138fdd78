r"""Text-to-video DiTs from 100M to 10B parameters, each sized for a Cloud TPU slice.

Clips of 4 s at 24 fps (97 frames: the causal VAE takes 1 + 4k) from your own videos
(`video_folder`), encoded by the Wan 2.1 VAE (4x8x8 compression to 16 channels: 25 latent frames) and
cut into (1, 2, 2) patches, captions encoded by UMT5-XXL. Clips of many sizes are packed NaViT-style
into rows of one nominal clip's tokens (`seq_len`); every model has size conditioning. bf16
compute, f32 parameters, scanned blocks with full rematerialisation: XLA's attention materialises
[tokens, tokens] logits, and only the block being differentiated may hold them
(experiments/video_dit.md has each size's per-device memory estimate, per remat policy).

  size  width x depth, heads  clip          tokens  slice     mesh (on the slice)
  100M   640 x 11, 10         97 x 256x256   6400   v6e-8     data 8
  1B    1536 x 20, 16         97 x 256x256   6400   v5p-32    fsdp 16
  3B    2560 x 20, 20         97 x 256x448  11200   v5p-128   fsdp 16 x tensor 4
  10B   4096 x 27, 32         97 x 320x576  18000   v5p-512   fsdp 64 x tensor 2 x sequence 2

Model-parallel axes (tensor x sequence) stay within one host's 4 chips: a host's devices hold whole
rows of the batch. Launch on a slice (creates it, installs, starts training on every worker;
experiments/README.md):

  experiments/launch_tpu.sh SIZE ZONE BUCKET

which runs on every worker, with the clips, the VAE and the encoder copied to /data:

  python -m sora_jax.train --config=configs/video_dit.py:1B --workdir=gs://BUCKET/runs/video_dit_1B \
      --distributed --config.data.folder=/data/clips --config.data.data_dir=gs://BUCKET/tfds \
      --config.autoencoder.path=/data/wan_vae --config.text.path=/data/umt5_xxl

A few real steps on the CPU with the sizes' layout (scanned remat blocks, bf16, XLA attention, the
size's -1 mesh axis taking the devices there are) and a tiny model on the `moving_shapes` data (a
minute or two on 2 cores; any VAE workdir of configs/vae_moving_shapes.py:runlocal):

  python -m sora_jax.train --config=configs/video_dit.py:3B,runlocal --workdir=/tmp/vd_local \
      --config.autoencoder.workdir=/tmp/vae_local

Arguments (comma separated after the colon): a size (100M, 1B, 3B, 10B; default 100M), `runlocal`.
"""

import ml_collections
from ml_collections import config_dict

from configs import moving_shapes
from sora_jax.diffusion.flow import resolution_shift

FPS = 24.0
FRAMES = 97  # 4 s at 24 fps, 1 + 4k for the causal VAE
PATCH = (1, 2, 2)
VAE = dict(kind="wan2.1", latent_channels=16, temporal_compression=4, spatial_compression=8)
# Where experiments/launch_tpu.sh puts the clips, the VAE (diffusers layout) and the text encoder
# (HF layout) on every worker.
DATA = "/data"

# Per size: the model, the clip it is sized for (frames, height, width), global rows of seq_len
# tokens per step, and the slice: accelerator type, chips, HBM per chip (GB), and the mesh there
# (config.mesh: -1 takes the slice's remaining chips).
SIZES = {
    "100M": dict(width=640, depth=11, num_heads=10, clip=(FRAMES, 256, 256), rows=16,
                 learning_rate=3e-4, slice="v6e-8", chips=8, hbm_gb=32,
                 mesh=dict(data=-1, fsdp=1, tensor=1, sequence=1)),
    "1B": dict(width=1536, depth=20, num_heads=16, clip=(FRAMES, 256, 256), rows=64,
               learning_rate=1e-4, slice="v5p-32", chips=16, hbm_gb=95,
               mesh=dict(data=1, fsdp=-1, tensor=1, sequence=1)),
    "3B": dict(width=2560, depth=20, num_heads=20, clip=(FRAMES, 256, 448), rows=64,
               learning_rate=1e-4, slice="v5p-128", chips=64, hbm_gb=95,
               mesh=dict(data=1, fsdp=-1, tensor=4, sequence=1)),
    "10B": dict(width=4096, depth=27, num_heads=32, clip=(FRAMES, 320, 576), rows=64,
                learning_rate=6e-5, slice="v5p-512", chips=256, hbm_gb=95,
                mesh=dict(data=1, fsdp=-1, tensor=2, sequence=2)),
}
DEFAULT_SIZE = "100M"


def tokens_per_clip(clip) -> int:
    """DiT tokens of a (frames, height, width) clip: VAE latents cut into PATCH patches."""
    frames, height, width = clip
    s = VAE["spatial_compression"]
    latent_frames = 1 + (frames - 1) // VAE["temporal_compression"]
    return (latent_frames // PATCH[0]) * (height // s // PATCH[1]) * (width // s // PATCH[2])


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = set(filter(None, (arg or "").split(",")))
    unknown = args - {"runlocal"} - set(SIZES)
    if unknown:
        raise ValueError(f"Unknown config arguments {sorted(unknown)}; valid: a size "
                         f"{list(SIZES)} and 'runlocal'.")
    sizes = args & set(SIZES)
    if len(sizes) > 1:
        raise ValueError(f"Give one size, not {sorted(sizes)}.")
    size = SIZES[sizes.pop() if sizes else DEFAULT_SIZE]
    runlocal = "runlocal" in args

    config = moving_shapes.get_config("runlocal" if runlocal else None)
    # The size's parallel layout everywhere: TPU-style matmuls and attention, scanned remat blocks.
    config.model.update(dtype="bfloat16", matmul="default", attention_backend="xla",
                        scan_layers=True, remat_policy="full")
    mesh = dict(size["mesh"])
    if runlocal:  # the axis that takes the slice's remaining chips takes whatever devices there are
        config.mesh = {axis: -1 if ways == -1 else 1 for axis, ways in mesh.items()}
        return config

    frames, height, width = size["clip"]
    seq_len = tokens_per_clip(size["clip"])
    config.data = dict(
        name="video_folder",
        builder_config="clips",
        folder=f"{DATA}/clips",  # your videos + captions.csv (data/video_folder.py)
        data_dir=config_dict.placeholder(str),
        max_area=height * width, max_frames=frames, target_fps=FPS, validation_fraction=0.01,
        frames=frames, height=height, width=width, fps=FPS,  # samples, and the nominal clip
        batching="pack",
        seq_len=seq_len,
        tokens_per_batch=size["rows"] * seq_len,
        max_clips=4,  # clips per row: their captions are the keys of cross-attention
        max_slots=4 * (1 + (frames - 1) // VAE["temporal_compression"]),
        batch_size=256,  # clips read at a time; a step takes tokens_per_batch of them
        worker_count=8,
        train_split="train", validation_split="validation", eval_split="validation",
        latent_cache=config_dict.placeholder(str),
    )
    config.autoencoder = dict(VAE, path=f"{DATA}/wan_vae")
    config.text = dict(encoder="umt5", path=f"{DATA}/umt5_xxl", dtype="bfloat16",
                       dim=4096, max_length=128, caption_dropout=0.1)
    config.model.update(patch_size=PATCH, width=size["width"], depth=size["depth"],
                        num_heads=size["num_heads"], size_conditioning=True)
    # More values per clip need more noise (SD3): the shift grows with the square root of the
    # latent values, 3 at 256x256.
    values = seq_len * PATCH[1] * PATCH[2] * VAE["latent_channels"]
    base = tokens_per_clip((frames, 256, 256)) * PATCH[1] * PATCH[2] * VAE["latent_channels"]
    config.diffusion.update(prediction="velocity", shift=resolution_shift(values, base, 3.0))
    config.optim.update(learning_rate=size["learning_rate"], warmup_steps=2000, weight_decay=0.0,
                        b2=0.999, ema_decay=0.9999)
    config.train.update(num_steps=300_000, log_every=100, eval_every=5000, sample_every=5000,
                        checkpoint_every=2000, max_to_keep=3, num_eval_batches=4, num_samples=4)
    config.sampling.update(steps=50, guidance=5.0)
    config.eval.update(num_prompts=64, batch_size=8)
    config.mesh = mesh
    return config
