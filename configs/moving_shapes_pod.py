r"""A DiT-XL-sized text-to-video model on `moving_shapes` at 17 frames of 64x64, for TPU pod slices.

675M-parameter DiT (width 1152, depth 28, 16 heads) in bf16 with f32 parameters, blocks scanned
and rematerialised, parameters and optimizer state sharded ZeRO-3 style over `fsdp` and heads/MLP
over `tensor`. Text from T5 v1.1 XXL's encoder in bf16, its 4.7B parameters sharded over the
same mesh. Written for a v5p-32 (16 chips) or v4-32 slice; the mesh takes whatever devices there
are (`fsdp=-1`). Launch on every worker (experiments/README.md), with the encoder's HF-format
files (config.json, model.safetensors.index.json and shards, spiece.model or tokenizer.json)
copied to a local folder on each:

  python -m sora_jax.train --config=configs/moving_shapes_pod.py --workdir=gs://BUCKET/ms_pod \
      --config.text.path=/data/t5-v1_1-xxl --distributed

A few real steps of a small model with the same parallel layout, on the CPU (~1 minute):

  python -m sora_jax.train --config=configs/moving_shapes_pod.py:runlocal --workdir=/tmp/pod_local
"""

from configs import moving_shapes


def get_config(arg: str | None = None):
    runlocal = "runlocal" in (arg or "").split(",")
    config = moving_shapes.get_config(arg)
    if not runlocal:
        config.data.update(builder_config="f17_s64", frames=17, height=64, width=64, batch_size=256)
        config.model.update(patch_size=(1, 2, 2), width=1152, depth=28, num_heads=16)
        config.optim.update(learning_rate=1e-4, warmup_steps=2000, ema_decay=0.9999)
        config.train.update(num_steps=200_000, log_every=100, eval_every=5000, sample_every=5000,
                            checkpoint_every=2000, max_to_keep=5)
        config.sampling.update(steps=50, guidance=5.0, guidance_rescale=0.0,
                               guidance_interval=(0.0, 1.0))
        config.eval.update(num_prompts=512, batch_size=64)
        config.diffusion.update(shift=3.0)  # 16x more values per clip than the CPU default
        # T5 v1.1 XXL's encoder (4.7B parameters, sharded over the mesh like the DiT):
        # --config.text.path=DIR with the checkpoint's HF files.
        config.text.update(encoder="t5", dim=4096, dtype="bfloat16", max_length=64)
    config.model.update(dtype="bfloat16", matmul="default", attention_backend="xla",
                        scan_layers=True, remat_policy="dots")
    # On one CPU device `runlocal` keeps the layout but cannot split heads two ways.
    config.mesh = dict(data=1, fsdp=-1, tensor=1 if runlocal else 2, sequence=1)
    return config
