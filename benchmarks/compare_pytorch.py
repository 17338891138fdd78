r"""Our DiT training step against diffusers' Latte in PyTorch, side by side in one process; prints
one JSON object.

  python benchmarks/compare_pytorch.py [--frames=4 --size=16 --channels=4 --patch=2 --width=384
      --depth=12 --heads=6 --batch=8 --text_len=32 --text_dim=384 --rounds=10
      --precisions=f32,mixed --packed --full_attention_reference --profile]
      [--config=configs/moving_shapes.py --config.x=y]

A full training step (forward, backward, AdamW update) at one shape, on both sides:

  ours     the config's DiT through `Experiment.jit_train_step`, the step that runs on TPU:
           cross-attention to text, 3D RoPE, a timestep per latent frame, conditioning masks, EMA
           and gradient clipping as configured; with --packed also the packed-batch step on the
           same clips (one clip per row of frames*size*size/patch^2 tokens; segment ids, gathered
           conditioning), which PyTorch has no counterpart for.
  PyTorch  diffusers' `LatteTransformer3DModel` (spatial blocks with cross-attention to the text,
           temporal blocks between them; adaLN-single, tanh GELU, biased projections) at the same
           width, heads, patch size, latent shape, text length and batch, trained on the same
           rectified-flow loss with `torch.optim.AdamW` (fused). Latte alternates spatial and
           temporal blocks, so `depth` transformer blocks are depth/2 of each (our blocks all
           attend over the whole video and to the text: ours does more FLOPs; both counts are
           reported). For images (--frames=1) Latte runs `depth` spatial blocks, temporal ones off.
           The targets are ratios to Latte.
  PyTorch, the same work (--full_attention_reference, on by default): diffusers'
           `PixArtTransformer2DModel`, whose `depth` blocks each attend over all the tokens and to
           the text, as ours do: the clip's frames side by side as one image of as many tokens, so
           the attention and matmul FLOPs match ours but for RoPE, qk-norm and the per-frame
           conditioning. Its ratio says how fast our code is at equal work.

in two precisions:

  f32    f32 everywhere on both sides (ours: dtype float32, matmul 'f32', attention 'cpu', the
         CPU paths of NOTES.md with f32 operands).
  mixed  ours: bf16 matmuls with f32 accumulation, forward and backward (dtype bfloat16, matmul
         'bf16', attention 'cpu'); PyTorch: bf16 autocast.

Both sides are compiled and warmed first; then every round runs one step of each, and one matmul
peak measurement, in turn, so a busy machine slows them alike. Reported: median step times (wall,
and the process's CPU time, which a busy machine disturbs less when each side runs one thread), the
ratios ours / PyTorch, model FLOPs per step (ours: `DiT.flops_per_example`; PyTorch: the matmuls
torch's FLOP counter sees plus the attention products, which it does not count on CPU; forward +
backward = 3x forward), the FLOP/s, and that as a fraction of the matmul peak (bf16 x bf16 -> f32
for mixed, f32 for f32) measured in the same rounds. torch runs on as many threads as XLA: one per
CPU this process may use (--threads limits them), under an allocator that keeps freed pages
(`benchmarks/common.py`). Batches are random arrays made once: this times the steps, not the input
pipeline.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common, op_profile  # noqa: E402

if __name__ == "__main__":
    common.use_fast_allocator()

import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/moving_shapes.py",
                                          "Config of our side: everything but the shape and precision.")
_FRAMES = flags.DEFINE_integer("frames", 4, "Latent frames (1: images).")
_SIZE = flags.DEFINE_integer("size", 16, "Latent height and width.")
_CHANNELS = flags.DEFINE_integer("channels", 4, "Latent channels.")
_PATCH = flags.DEFINE_integer("patch", 2, "Spatial patch size (temporal patch 1).")
_WIDTH = flags.DEFINE_integer("width", 384, "Model width.")
_DEPTH = flags.DEFINE_integer("depth", 12, "Transformer blocks (Latte video: half spatial, half temporal).")
_HEADS = flags.DEFINE_integer("heads", 6, "Attention heads.")
_BATCH = flags.DEFINE_integer("batch", 8, "Clips per step.")
_TEXT_LEN = flags.DEFINE_integer("text_len", 32, "Caption tokens.")
_TEXT_DIM = flags.DEFINE_integer("text_dim", 384, "Width of the caption tokens.")
_ROUNDS = flags.DEFINE_integer("rounds", 10, "Timed rounds (after one warm-up round).")
_PRECISIONS = flags.DEFINE_list("precisions", ["f32", "mixed"], "Precisions to compare.")
_PACKED = flags.DEFINE_boolean("packed", True, "Also time our packed-batch step.")
_FULL = flags.DEFINE_boolean(
    "full_attention_reference", True,
    "Also time PixArt-alpha's transformer (full attention, cross-attention in every block): the same "
    "work as ours, where Latte's factorised attention does less.")
_PROFILE = flags.DEFINE_boolean(
    "profile", False, "Also trace our step after the timed rounds and add where its time goes "
    "(`op_profile.py`: dense matmuls, attention's batched matmuls, the rest; CPU only).")
_THREADS = flags.DEFINE_integer(
    "threads", None, "CPUs this process runs on, hence XLA's and torch's threads; default: all it may use.")

PRECISIONS = {
    "f32": {"model": dict(dtype="float32", matmul="f32", attention_backend="cpu"),
            "pytorch": "float32", "peak": "float32", "target": 0.95},
    "mixed": {"model": dict(dtype="bfloat16", matmul="bf16", attention_backend="cpu"),
              "pytorch": "bfloat16 autocast", "peak": "bfloat16", "target": 0.8},
}
_MATMUL_PEAK_TARGET = 0.7  # mixed: fraction of the bf16 matmul peak


def check_flags() -> None:
    unknown = set(_PRECISIONS.value) - set(PRECISIONS)
    if unknown:
        raise ValueError(f"Unknown --precisions {sorted(unknown)}; valid: {sorted(PRECISIONS)}.")
    if _SIZE.value % _PATCH.value:
        raise ValueError(f"--size={_SIZE.value} is not a multiple of --patch={_PATCH.value}.")
    if _WIDTH.value % _HEADS.value:
        raise ValueError(f"--width={_WIDTH.value} is not a multiple of --heads={_HEADS.value}.")
    if _FRAMES.value > 1 and _DEPTH.value % 2:
        raise ValueError(f"--depth={_DEPTH.value} must be even for videos: Latte's blocks come in "
                         "(spatial, temporal) pairs.")


def our_config(precision: str, packed: bool):
    """The --config with the benchmark's shape and the precision's model settings."""
    import ml_collections

    c = ml_collections.ConfigDict(_CONFIG.value.to_dict())
    f, s, p = _FRAMES.value, _SIZE.value, _PATCH.value
    # Latents as they are: an autoencoder geometry without compression.
    c.autoencoder = dict(kind="causal_vae", workdir="unused", latent_channels=_CHANNELS.value,
                         temporal_compression=1, spatial_compression=1)
    c.data.update(frames=f, height=s, width=s, batch_size=_BATCH.value)
    c.text.update(max_length=_TEXT_LEN.value, dim=_TEXT_DIM.value)
    c.model.update(patch_size=(1, p, p), width=_WIDTH.value, depth=_DEPTH.value,
                   num_heads=_HEADS.value, mlp_ratio=4.0, **PRECISIONS[precision]["model"])
    if packed:
        tokens = f * (s // p) ** 2
        c.data.update(batching="pack", tokens_per_batch=_BATCH.value * tokens, seq_len=tokens,
                      max_clips=1, max_slots=f)
    return c


def packed_batch(exp, grid):
    """The clips of a grid batch (`common.random_batch`), packed one per row (`data.packing.pack`)."""
    import jax
    import numpy as np

    from sora_jax.data import packing

    d, b = exp.config.data, exp.batcher
    grid = jax.device_get(grid)
    clips = [{"latent": grid["latent"][i], "text": grid["text"][i], "text_mask": grid["text_mask"][i],
              "frames": d.frames, "fps": 8.0, "height": d.height, "width": d.width}
             for i in range(d.batch_size)]
    packed = packing.pack(clips, seq_len=b.seq_len, max_clips=b.max_clips, max_slots=b.max_slots,
                          patch_size=b.patch_size, text_len=b.text_len, num_rows=d.batch_size)
    packed = {k: np.asarray(packed[k]) for k in exp.batch_shapes()}
    return jax.device_put(packed, exp.batch_shardings(packed))


class OurStep:
    """Our jitted, donating train step on a fixed batch; `__call__` runs one step and waits."""

    def __init__(self, exp, batch):
        import jax

        self.exp, self.batch = exp, batch
        self.state = exp.init_state(jax.random.key(0))
        self.step = exp.jit_train_step()
        self.rng = jax.random.key(1)

    def __call__(self):
        import jax

        with self.exp.activate():
            self.state, self.metrics = self.step(self.state, self.batch, self.rng)
        jax.block_until_ready(self.metrics)


def latte(frames: int):
    """diffusers' Latte at the benchmark's shape: `depth` blocks in (spatial, temporal) pairs for
    videos; for images `depth` spatial blocks, whose temporal partners are frozen and skipped."""
    from diffusers import LatteTransformer3DModel

    video = frames > 1
    model = LatteTransformer3DModel(
        num_attention_heads=_HEADS.value, attention_head_dim=_WIDTH.value // _HEADS.value,
        in_channels=_CHANNELS.value, out_channels=_CHANNELS.value,
        num_layers=_DEPTH.value // 2 if video else _DEPTH.value, cross_attention_dim=_WIDTH.value,
        attention_bias=True, sample_size=_SIZE.value, patch_size=_PATCH.value,
        activation_fn="gelu-approximate", norm_type="ada_norm_single", norm_elementwise_affine=False,
        norm_eps=1e-6, caption_channels=_TEXT_DIM.value, video_length=frames)
    if not video:
        model.temporal_transformer_blocks.requires_grad_(False)
    return model


def pixart():
    """diffusers' PixArt-alpha transformer at the benchmark's shape: `depth` blocks of self-attention
    over all the tokens, cross-attention to the text and an MLP, on the frames side by side."""
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(
        num_attention_heads=_HEADS.value, attention_head_dim=_WIDTH.value // _HEADS.value,
        in_channels=_CHANNELS.value, out_channels=_CHANNELS.value, num_layers=_DEPTH.value,
        cross_attention_dim=_WIDTH.value, attention_bias=True, sample_size=_SIZE.value,
        patch_size=_PATCH.value, activation_fn="gelu-approximate", norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=_TEXT_DIM.value,
        use_additional_conditions=False)


def attention_flops(model: str, frames: int) -> float:
    """Forward FLOPs of the attention products (q k^T and p v), which torch's FLOP counter misses on
    CPU. Latte: spatial self-attention per frame, temporal per position, cross per frame, in
    depth/2 blocks each (depth spatial ones for images). PixArt: self-attention over all the tokens
    and cross-attention, in every block."""
    n, w, lc = (_SIZE.value // _PATCH.value) ** 2, _WIDTH.value, _TEXT_LEN.value
    if model == "pixart":
        tokens = frames * n
        return 2.0 * _BATCH.value * _DEPTH.value * (2 * tokens * tokens * w + 2 * tokens * lc * w)
    spatial_blocks = _DEPTH.value // 2 if frames > 1 else _DEPTH.value
    spatial = frames * (2 * n * n * w + 2 * n * lc * w)
    temporal = n * 2 * frames * frames * w if frames > 1 else 0
    return 2.0 * _BATCH.value * spatial_blocks * (spatial + temporal)


class TorchStep:
    """One rectified-flow training step of Latte or PixArt with AdamW, in f32 or under bf16
    autocast."""

    def __init__(self, model: str, autocast: bool):
        import torch

        torch.manual_seed(0)
        b, f, s, c = _BATCH.value, _FRAMES.value, _SIZE.value, _CHANNELS.value
        self.kind = model
        self.model = (latte(f) if model == "latte" else pixart()).train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=True)
        # Latte's layout: [B, C, F, H, W]; PixArt's: [B, C, H, F * W], the frames side by side.
        shape = (b, c, f, s, s) if model == "latte" else (b, c, s, f * s)
        self.x0 = torch.rand(*shape) * 2 - 1
        self.text = torch.randn(b, _TEXT_LEN.value, _TEXT_DIM.value)
        self.autocast = autocast
        self.video = f > 1

    def loss(self):
        import torch

        x0 = self.x0
        t = torch.sigmoid(torch.randn(x0.shape[0]))  # logit-normal flow time
        noise = torch.randn_like(x0)
        tb = t.reshape(-1, *[1] * (x0.ndim - 1))
        extra = (dict(enable_temporal_attentions=self.video) if self.kind == "latte"
                 else dict(added_cond_kwargs={"resolution": None, "aspect_ratio": None}))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            velocity = self.model(
                (1 - tb) * x0 + tb * noise, timestep=1000 * t, encoder_hidden_states=self.text,
                return_dict=False, **extra)[0]
        return torch.mean(torch.square(velocity.float() - (noise - x0)))

    def __call__(self):
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss()
        loss.backward()
        self.opt.step()
        self.value = loss.detach()

    def flops_per_step(self) -> float:
        """The matmul FLOPs of a forward and backward pass as torch counts them (f32, no autocast),
        plus the attention products it does not count (3x their forward)."""
        from torch.utils.flop_counter import FlopCounterMode

        autocast, self.autocast = self.autocast, False
        with FlopCounterMode(display=False) as counter:
            self.loss().backward()
        self.autocast = autocast
        self.opt.zero_grad(set_to_none=True)
        return counter.get_total_flops() + 3 * attention_flops(self.kind, _FRAMES.value)


def compare(precision: str) -> dict:
    """Both sides' steps at one precision, timed in interleaved rounds with the matmul peak."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sora_jax.training.experiment import Experiment

    setting = PRECISIONS[precision]
    exp = Experiment(our_config(precision, packed=False))
    batch = common.random_batch(exp, jax.random.key(0))
    runs = {"ours": OurStep(exp, batch)}
    if _PACKED.value:
        packed_exp = Experiment(our_config(precision, packed=True))
        runs["ours_packed"] = OurStep(packed_exp, packed_batch(packed_exp, batch))
    torch_step = runs["pytorch"] = TorchStep("latte", autocast=precision == "mixed")
    torch_flops = torch_step.flops_per_step()
    if _FULL.value:
        runs["pytorch_full"] = TorchStep("pixart", autocast=precision == "mixed")
        full_flops = runs["pytorch_full"].flops_per_step()
    first_s = {}
    for name, run in runs.items():
        first_s[name] = common.timed(run)()[0]
        common.log(f"{precision} {name}: first step (compile) {first_s[name]:.1f} s")

    peak_dtype = jnp.bfloat16 if setting["peak"] == "bfloat16" else jnp.float32
    timed = {name: common.timed(run) for name, run in runs.items()}
    timed["peak"] = lambda: common.matmul_peak(peak_dtype, seconds=0.5)

    def progress(i, kept):
        common.log(f"{precision} round {i + 1}/{_ROUNDS.value}: " + ", ".join(
            f"{k} {np.median([v[0] for v in vs]):.3f} s (CPU {np.median([v[1] for v in vs]):.3f} s)"
            if k != "peak" else f"peak {np.median([v[0] for v in vs]) / 1e9:.0f} GFLOP/s"
            for k, vs in kept.items()))

    kept = common.interleaved(timed, _ROUNDS.value, on_round=progress)
    median = lambda k, i: float(np.median([v[i] for v in kept[k]]))
    wall, cpu = {k: median(k, 0) for k in kept}, {k: median(k, 1) for k in kept}
    flops = {"ours": exp.train_flops_per_step(), "pytorch": torch_flops}
    flops["ours_packed"] = flops["ours"]  # the same clips, one per row
    if _FULL.value:
        flops["pytorch_full"] = full_flops
    sides = [k for k in runs if not k.startswith("pytorch")]
    result = {
        "ours_config": dict(setting["model"]),
        "pytorch_precision": setting["pytorch"],
        "step_s": {k: round(wall[k], 4) for k in runs},
        "step_cpu_s": {k: round(cpu[k], 4) for k in runs},
        "step_min_s": {k: round(min(v[0] for v in kept[k]), 4) for k in runs},
        "step_kernel_s": {k: round(median(k, 2), 4) for k in runs},
        "page_faults_per_step": {k: int(median(k, 3)) for k in runs},
        # ours / PyTorch: by median wall time (the target), and by CPU time, which a busy machine
        # disturbs less where each side runs on one thread.
        "ratio": {k: wall[k] / wall["pytorch"] for k in sides},
        "cpu_ratio": {k: cpu[k] / cpu["pytorch"] for k in sides},
        "target_ratio": setting["target"],
        "ratio_per_round": [a[0] / b[0] for a, b in zip(kept["ours"], kept["pytorch"])],
        "model_flops_per_step": flops["ours"],
        "pytorch_model_flops_per_step": torch_flops,
        "flops_per_s": {k: flops[k] / wall[k] for k in runs},
        "peak_flops_per_s": wall["peak"],
        "peak_flops_per_cpu_s": cpu["peak"],
        "peak_definition": common.peak_definition(peak_dtype),
        "fraction_of_peak": {k: flops[k] / wall[k] / wall["peak"] for k in runs},
        "cpu_fraction_of_peak": {k: flops[k] / cpu[k] / cpu["peak"] for k in runs},
        # Time per FLOP, ours / PyTorch: the ratio had both sides done the same work.
        "ratio_per_flop": (wall["ours"] / flops["ours"]) / (wall["pytorch"] / torch_flops),
        "first_step_s": {k: round(v, 2) for k, v in first_s.items()},
        "loss": {"ours": float(runs["ours"].metrics["loss"]), "pytorch": float(torch_step.value)},
    }
    if _FULL.value:
        # Against the same work (PixArt: full attention and cross-attention in every block).
        result["ratio_same_work"] = {k: wall[k] / wall["pytorch_full"] for k in sides}
        result["cpu_ratio_same_work"] = {k: cpu[k] / cpu["pytorch_full"] for k in sides}
        result["pytorch_full_model_flops_per_step"] = flops["pytorch_full"]
        result["loss"]["pytorch_full"] = float(runs["pytorch_full"].value)
    if precision == "mixed":
        result["target_fraction_of_peak"] = _MATMUL_PEAK_TARGET
    if _PROFILE.value:
        ours = runs["ours"]
        with exp.activate():
            result["profile"] = op_profile.profile(ours.step, (ours.state, ours.batch, ours.rng), top=12)
    return result


def main(argv):
    del argv
    check_flags()
    # Before jax's CPU backend starts: it sizes its thread pool by the CPUs it may run on.
    threads = common.limit_cpus(_THREADS.value)
    import diffusers
    import flax
    import jax
    import torch

    torch.set_num_threads(threads)
    f, s, p = _FRAMES.value, _SIZE.value, _PATCH.value
    results = {precision: compare(precision) for precision in _PRECISIONS.value}
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    print(json.dumps({
        "benchmark": "compare_pytorch",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{cpu}, {os.cpu_count()} CPUs",
        "platform": jax.devices()[0].platform,
        "threads": {"xla": threads, "torch": torch.get_num_threads()},
        "allocator": common.allocator(),
        "versions": {"jax": jax.__version__, "flax": flax.__version__, "torch": torch.__version__,
                     "diffusers": diffusers.__version__},
        "shape": {"latent": [f, s, s, _CHANNELS.value], "patch": [1, p, p], "batch": _BATCH.value,
                  "tokens_per_example": f * (s // p) ** 2, "text": [_TEXT_LEN.value, _TEXT_DIM.value],
                  "width": _WIDTH.value, "depth": _DEPTH.value, "heads": _HEADS.value},
        "pytorch_model": ("LatteTransformer3DModel, "
                          + (f"{_DEPTH.value // 2} spatial + {_DEPTH.value // 2} temporal blocks"
                             if f > 1 else f"{_DEPTH.value} spatial blocks, temporal off")),
        "pytorch_full_model": (f"PixArtTransformer2DModel, {_DEPTH.value} blocks on a "
                               f"{s} x {f * s} latent" if _FULL.value else None),
        "rounds": _ROUNDS.value,
        **results,
    }, default=str))


if __name__ == "__main__":
    app.run(main)
