r"""Useful tokens per second of the packed DiT train step with padded, bucketed and packed batches of
the same mixed-size clips, under one token budget; prints one JSON object.

  python benchmarks/packing.py [--config=configs/moving_shapes.py] [--builder_config=mixed_s16]
      [--tokens_per_batch=1024] [--seq_len=256] [--max_clips=8] [--steps=10]
      [--batchings=pad,bucket,pack] [--config.x=y]

Clips: sizes drawn by the moving_shapes builder config's `sample_size` (nothing is built), mapped to
latent shapes by the config's autoencoder geometry, with random latents and random caption tokens
[text.max_length, text dim] under masks of random length; every batching reads the same seeded
stream. The model is the config's DiT with size conditioning, trained by `make_packed_train_step`
(jitted, state donated) on `data.batching.Batcher`'s batches:

  pad     rows of the largest clip the size distribution allows, one clip each
  bucket  one size per batch, rows from the budget: one compiled step per distinct batch shape
  pack    rows of --seq_len tokens, up to --max_clips clips and seq_len // (fewest tokens per
          temporal position) temporal positions each

Every distinct batch shape is compiled first (its first call, compile and run, is reported apart)
and called once more to warm up. Then --steps rounds each run one step of every batching in turn,
so that a busy machine slows all three alike: pad and pack step through consecutive batches of the
stream, bucket through one batch of each of its shapes, weighed by how often the stream fills a
batch of that shape (a stream of --mix_clips sizes), so that its figures hold for a long run rather
than for the few large-clip buckets that fill first. Throughput uses median step times: steps/s,
tokens/s (all positions, padding included), useful tokens/s (clip tokens only), clips/s, and the
packing efficiency (useful / all positions). Batches are made before timing: this times the step,
not the batcher (its host time per batch is reported apart).
"""

import collections
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/moving_shapes.py", "Config file.")
_BUILDER_CONFIG = flags.DEFINE_string("builder_config", "mixed_s16",
                                      "A mixed-size moving_shapes builder config: the clip sizes.")
_TOKENS = flags.DEFINE_integer("tokens_per_batch", 1024, "Latent tokens per batch, padding included.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "Tokens per packed row ('pack').")
_MAX_CLIPS = flags.DEFINE_integer("max_clips", 8, "Clips per packed row ('pack').")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per batching (bucket: per batch shape).")
_MIX_CLIPS = flags.DEFINE_integer("mix_clips", 20_000, "Sizes drawn to weigh the bucket shapes.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the clip stream.")
_BATCHINGS = flags.DEFINE_list("batchings", ["pad", "bucket", "pack"], "The batchings to time.")

BATCH_KEYS = ("tokens", "segment_ids", "positions", "slot", "slot_clip", "text", "text_mask", "sizes")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv):
    del argv
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sora_jax.data import moving_shapes
    from sora_jax.data.batching import BATCHINGS, Batcher
    from sora_jax.training import metrics
    from sora_jax.training import state as state_lib
    from sora_jax.training.experiment import Experiment
    from sora_jax.training.step import make_packed_train_step

    unknown = set(_BATCHINGS.value) - set(BATCHINGS)
    if unknown:
        raise ValueError(f"Unknown --batchings {sorted(unknown)}; valid: {list(BATCHINGS)}.")
    exp = Experiment(_CONFIG.value)
    c = exp.config
    sizes_config = {b.name: b for b in moving_shapes.MovingShapes.BUILDER_CONFIGS}[_BUILDER_CONFIG.value]
    if not isinstance(sizes_config, moving_shapes.MixedMovingShapesConfig):
        raise ValueError(f"--builder_config={_BUILDER_CONFIG.value} has one clip size; "
                         "choose a mixed one (e.g. mixed_s16).")
    model = exp.model.clone(size_conditioning=True)
    patch = tuple(c.model.patch_size)
    text_len, text_dim = c.text.max_length, model.text_dim

    def grid(frames, height, width):
        latent = exp.autoencoder.latent_shape(frames, height, width)
        return latent, tuple(s // p for s, p in zip(latent[:3], patch))

    durations = ((1,) if sizes_config.image_fraction > 0 else ()) + (
        tuple(sizes_config.durations) if sizes_config.image_fraction < 1 else ())
    grids = [grid(f, h, w)[1] for f in durations for h, w in sizes_config.resolutions]
    pad_len = max(math.prod(g) for g in grids)
    pack_slots = _SEQ_LEN.value // min(g[1] * g[2] for g in grids)

    def clip_stream():
        rng = np.random.default_rng(_SEED.value)
        while True:
            frames, height, width = sizes_config.sample_size(rng)
            latent_shape, _ = grid(frames, height, width)
            yield {"latent": rng.standard_normal(latent_shape, np.float32),
                   "text": rng.standard_normal((text_len, text_dim), np.float32),
                   "text_mask": np.arange(text_len) < rng.integers(1, text_len + 1),
                   "frames": frames, "fps": moving_shapes.NOMINAL_FPS,
                   "height": height, "width": width}

    batchers = {
        "pad": Batcher("pad", _TOKENS.value, pad_len, 1, max(g[0] for g in grids), patch, text_len),
        "bucket": Batcher("bucket", _TOKENS.value, pad_len, 1, max(g[0] for g in grids), patch,
                          text_len),
        "pack": Batcher("pack", _TOKENS.value, _SEQ_LEN.value, _MAX_CLIPS.value, pack_slots, patch,
                        text_len),
    }

    # How often a long stream fills a bucket of each shape: its clips' share over its rows.
    mix_rng = np.random.default_rng(_SEED.value + 1)
    size_counts = collections.Counter(grid(*sizes_config.sample_size(mix_rng))[1]
                                      for _ in range(_MIX_CLIPS.value))

    def signature(batch):
        return tuple(batch[k].shape for k in BATCH_KEYS)

    model_init = jax.jit(lambda rng: model.init(
        rng, jnp.zeros((1, *exp.latent_shape)), jnp.zeros((1, exp.latent_shape[0] // patch[0])),
        jnp.zeros((1, text_len, text_dim)), jnp.ones((1, text_len), bool),
        sizes=jnp.ones((1, 5)))["params"])

    def init_state():
        params = nn.meta.unbox(model_init(jax.random.key(c.seed)))
        group = state_lib.Group.create(params, exp.tx, c.optim.ema_decay)
        return state_lib.TrainState(step=jnp.zeros((), jnp.int32), groups={"dit": group})

    def stats(batch):
        real = batch["segment_ids"] > 0
        return {"tokens": real.size, "useful": int(real.sum()), "clips": int((batch["clip_id"] >= 0).sum())}

    # Batches, compiled steps and warm states of every batching first; then rounds that time each
    # batching in turn, so that a busy machine slows all three alike.
    runs = {}
    for kind in _BATCHINGS.value:
        stream = batchers[kind](clip_stream())
        host_start = time.perf_counter()
        if kind == "bucket":  # one batch of each shape, in the order the stream fills them
            batches = {}
            while len(batches) < len({(math.prod(g), g[0]) for g in grids}):
                batch = next(stream)
                batches.setdefault(signature(batch), batch)
            batches = list(batches.values())
        else:
            batches = [next(stream) for _ in range(_STEPS.value)]
        host_s = (time.perf_counter() - host_start) / len(batches)
        step = jax.jit(make_packed_train_step(
            model, exp.flow, tx=exp.tx, schedule=exp.schedule, ema_decay=c.optim.ema_decay,
            caption_dropout=c.text.caption_dropout), donate_argnums=(0,))
        runs[kind] = {"batches": batches, "host_s": host_s, "step": step, "state": init_state(),
                      "device": [jax.device_put({k: b[k] for k in BATCH_KEYS}) for b in batches],
                      "compile_s": {}, "times": [[] for _ in batches]}

    def run(kind, i):
        r = runs[kind]
        start = time.perf_counter()
        r["state"], m = r["step"](r["state"], r["device"][i], jax.random.key(1))
        jax.block_until_ready(m)
        return time.perf_counter() - start

    for kind, r in runs.items():
        for i, batch in enumerate(r["batches"]):
            if signature(batch) not in r["compile_s"]:
                r["compile_s"][signature(batch)] = run(kind, i)
                run(kind, i)  # the first call after compiling still warms caches
                log(f"{kind}: compiled {batch['segment_ids'].shape} (rows, tokens) in "
                    f"{r['compile_s'][signature(batch)]:.1f} s")

    peak = metrics.peak_flops_per_device(model.dtype)
    for round_ in range(_STEPS.value):
        for kind, r in runs.items():
            for i in range(len(r["batches"])) if kind == "bucket" else (round_,):
                r["times"][i].append(run(kind, i))
        log(f"round {round_ + 1}/{_STEPS.value}: " + ", ".join(
            f"{kind} {np.median(sum(r['times'], [])):.3f} s" for kind, r in runs.items()))

    results = {}
    for kind, r in runs.items():
        batches = r["batches"]
        if kind == "bucket":  # each shape as often as a long stream fills a batch of it
            weights, shapes = [], []
            for batch, times in zip(batches, r["times"]):
                rows, length = batch["segment_ids"].shape
                slots = batch["slot_clip"].shape[1]
                clips = sum(n for g, n in size_counts.items() if (math.prod(g), g[0]) == (length, slots))
                weights.append(clips / rows / _MIX_CLIPS.value)
                shapes.append({"rows": rows, "tokens_per_clip": length, "slots": slots,
                               "step_time_s": round(float(np.median(times)), 4),
                               "compile_and_first_step_s": round(r["compile_s"][signature(batch)], 2),
                               "batches_per_clip": round(weights[-1], 5)})
            w = np.asarray(weights) / sum(weights)
            per_batch = {k: float(w @ [stats(b)[k] for b in batches]) for k in ("tokens", "useful", "clips")}
            step_s = float(w @ [np.median(t) for t in r["times"]])  # mean over the mix of shapes
        else:
            times = [t for ts in r["times"] for t in ts]
            per_batch = {k: float(np.mean([stats(b)[k] for b in batches]))
                         for k in ("tokens", "useful", "clips")}
            step_s = float(np.median(times))
            shapes = [{"rows": batches[0]["segment_ids"].shape[0],
                       "tokens_per_row": batches[0]["segment_ids"].shape[1],
                       "clips_per_row": batches[0]["clip_id"].shape[1],
                       "slots_per_row": batches[0]["slot_clip"].shape[1],
                       "step_time_min_s": round(min(times), 4)}]
        results[kind] = {
            "steps_per_s": 1.0 / step_s,
            "step_time_s": round(step_s, 4),
            "tokens_per_s": per_batch["tokens"] / step_s,
            "useful_tokens_per_s": per_batch["useful"] / step_s,
            "packing_efficiency": per_batch["useful"] / per_batch["tokens"],
            "clips_per_s": per_batch["clips"] / step_s,
            "tokens_per_batch": per_batch["tokens"],
            "clips_per_batch": per_batch["clips"],
            "compiled_shapes": len(r["compile_s"]),
            "compile_and_first_step_s": round(sum(r["compile_s"].values()), 2),
            "host_batching_s_per_batch": round(r["host_s"], 4),
            "shapes": shapes,
        }

    useful = {k: r["useful_tokens_per_s"] for k, r in results.items()}
    print(json.dumps({
        "benchmark": "packing",
        "platform": jax.devices()[0].platform,
        "device_kind": jax.devices()[0].device_kind,
        "model": dict(c.model) | {"size_conditioning": True},
        "builder_config": _BUILDER_CONFIG.value,
        "tokens_per_batch": _TOKENS.value,
        "seq_len": {"pad": pad_len, "pack": _SEQ_LEN.value},
        "max_clips_pack": _MAX_CLIPS.value,
        "max_slots_pack": pack_slots,
        "text_tokens": [text_len, text_dim],
        "steps": _STEPS.value,
        "peak_flops_per_s": peak,
        "peak_definition": ("matmul peak measured in this process ("
                            + ("bf16 x bf16 -> f32" if model.dtype == jnp.bfloat16 else "f32")
                            + ")" if jax.devices()[0].platform == "cpu" else "published bf16 peak"),
        **results,
        "useful_tokens_per_s_ratio": {f"{k}/pad": useful[k] / useful["pad"] for k in useful
                                      if k != "pad" and "pad" in useful},
    }, default=str))


if __name__ == "__main__":
    app.run(main)
