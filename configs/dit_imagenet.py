r"""The DiT paper's class-conditional ImageNet 256x256 models (Peebles & Xie 2023), e.g. DiT-XL/2.

`get_config('XL/2')` (the default; any of S, B, L, XL with patch 2, 4 or 8) is the paper's setup:
32x32x4 latents of ImageNet images (Stable Diffusion's VAE, scaled by 0.18215), 1000 classes and a
null class (labels dropped 10% of the time), the 1000-step linear-beta DDPM with learned sigma and
the hybrid loss (sora_jax/diffusion/ddpm.py), AdamW at 1e-4 constant, no weight decay, batch 256,
EMA 0.9999. Sampling: DDIM with classifier-free guidance 1.5, guiding the first 3 latent channels
as DiT's released sampling code does. The model (sora_jax/models/class_dit.py) runs in bf16 with
f32 parameters, its blocks scanned and rematerialised, parameters and optimizer state sharded over
`fsdp` (all devices). DiT-XL/2 has 675M parameters and costs 118.6 Gflops per image forward (the
paper's count; `ClassDiT.paper_gflops`).

The project has no ImageNet latent dataset yet: the full-size variants build (their init and train
step trace on any mesh, as tests/test_class_dit.py checks) but need a tfds builder of ImageNet
latents named by config.data.name, with a 'latent' [32, 32, 4] and a ClassLabel 'label', to train.

`runlocal` is a tiny S-like model (width 64, depth 2, patches of 4) in pixel space on the first frame
of `moving_shapes/tiny` clips (16x16x3), with the clip's shape (square, circle, triangle) as its
class; a few real steps on the CPU:

  python -m sora_jax.train --config=configs/dit_imagenet.py:runlocal --workdir=/tmp/dit_local

Arguments (comma separated after the colon): a model name ('S/2', ..., 'XL/8'), `runlocal`.
"""

import ml_collections
from ml_collections import config_dict

from sora_jax.models.class_dit import model_size
from sora_jax.parallel.mesh import DEFAULT_RULES


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = set(filter(None, (arg or "").split(",")))
    names = {a for a in args if "/" in a}
    unknown = args - names - {"runlocal"}
    if unknown or len(names) > 1:
        raise ValueError(f"Unknown config arguments {sorted(unknown or names)}; valid: one model name "
                         "such as 'XL/2', and 'runlocal'.")
    runlocal = "runlocal" in args
    name = names.pop() if names else ("S/4" if runlocal else "XL/2")
    model_size(name)  # refuses unknown names

    config = ml_collections.ConfigDict()
    config.seed = 0
    config.task = "class_dit"

    if runlocal:
        config.data = dict(name="moving_shapes", builder_config="tiny", frames=5, height=16, width=16,
                           image_size=16, label="shape")
    else:
        config.data = dict(name="imagenet256_latents", builder_config="sd_vae_ft_ema", frames=1,
                           height=256, width=256, image_size=32, label="label")
    config.data.update(
        data_dir=config_dict.placeholder(str),
        batch_size=8 if runlocal else 256,  # global; split over the mesh's batch axes
        worker_count=0,
        train_split="train",
        validation_split="validation",
    )

    config.model = dict(
        name=name,
        in_channels=3 if runlocal else 4,
        num_classes=3 if runlocal else 1000,
        null_class=True,
        learn_sigma=True,
        dtype="float32" if runlocal else "bfloat16",
        matmul="default",
        attention_backend="xla",
        scan_layers=not runlocal,
        remat_policy="none" if runlocal else "full",
    )
    if runlocal:
        config.model.update(width=64, depth=2, num_heads=2)
    config.class_dropout = 0.1
    config.diffusion = dict(num_steps=1000, beta_start=1e-4, beta_end=0.02, prediction="epsilon")
    # guided_channels=3: DiT's forward_with_cfg guides only the first 3 of 4 latent channels; None
    # guides all (the standard approach).
    config.sampling = dict(steps=8 if runlocal else 250, eta=0.0, guidance=1.5,
                           guided_channels=config_dict.placeholder(int) if runlocal else 3)

    config.optim = dict(learning_rate=1e-3 if runlocal else 1e-4, warmup_steps=0, decay="constant",
                        end_fraction=1.0, weight_decay=0.0, b1=0.9, b2=0.999, grad_clip=0.0,
                        grad_accum_steps=1, ema_decay=0.99 if runlocal else 0.9999)
    config.train = dict(
        num_steps=6 if runlocal else 400_000,
        log_every=2 if runlocal else 100,
        eval_every=3 if runlocal else 10_000,
        sample_every=6 if runlocal else 50_000,
        checkpoint_every=3 if runlocal else 10_000,
        max_to_keep=2 if runlocal else 5,
        num_eval_batches=1 if runlocal else 4,
        eval_timesteps=(10, 250, 500, 750, 990),
        num_samples=3 if runlocal else 16,
    )

    config.mesh = dict(data=-1, fsdp=1, tensor=1, sequence=1) if runlocal else \
        dict(data=1, fsdp=-1, tensor=1, sequence=1)
    config.sharding_rules = [list(rule) for rule in DEFAULT_RULES]
    return config
