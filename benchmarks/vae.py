r"""Measures the causal video VAE's speed and memory against video length and resolution, and prints
one JSON object.

  python benchmarks/vae.py [--config=configs/vae_moving_shapes.py] [--shapes=9x16x16,33x16x16]
      [--batch=1] [--chunk_latent_frames=2] [--repeats=3] [--shard=frames|height] [--config.vae.x=y]

For each video shape (frames x height x width) it reports the median time, after compilation, of
whole-clip `encode` and `decode` and of `decode_chunked(..., to_host=True)`, as pixel frames per
second, and the device memory of whole-clip encoding and of whole-clip and chunked decoding.
Weights are random (`init_net`, shift 0 and scale 1): the time and memory of a forward pass do not
depend on training.

Memory comes from XLA's analysis of the compiled programs, not from measuring a process: a call of
a compiled function holds its arguments, its outputs and XLA's temporaries at once, so it needs
`argument_size_in_bytes + output_size_in_bytes + temp_size_in_bytes - alias_size_in_bytes` bytes
(`memory_bytes`; the alias term counts outputs written over donated arguments). Chunked decoding
runs one compiled step per chunk, whose arguments include the cache carried from the previous chunk
and whose outputs include the next one; a clip compiles at most three distinct steps (the first
chunk, full later chunks, a shorter last chunk). Its peak is the largest step plus what stays on
the device between steps: the latent and its de-normalised copy, and the previous decoded chunk
until the next one replaces it (`chunked_decode_memory`). Decoded chunks go to host memory.

With --shard, it also reports the per-device memory of `sharded_encode` / `sharded_decode`
(parallel/vae_sharding.py) with the clip's frames or rows split over all devices (a `sequence` mesh
axis), compiled only. On a CPU, emulate devices:
  XLA_FLAGS=--xla_force_host_platform_device_count=4 python benchmarks/vae.py --shard=frames \
      --shapes=33x32x32
"""

import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from sora_jax.models import vae as vae_lib  # noqa: E402
from sora_jax.parallel import mesh as mesh_lib, vae_sharding  # noqa: E402

FLAGS = flags.FLAGS


def memory_bytes(compiled) -> int:
    """Device bytes one call of a compiled function holds at once (see the module docstring)."""
    m = compiled.memory_analysis()
    return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
            - m.alias_size_in_bytes)


def _nbytes(tree) -> int:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def decode_memory(vae: vae_lib.CausalVAE, params, latent_shape) -> int:
    """Bytes of whole-clip `vae.decode` of a float32 latent [B, t, h, w, C]. params may be arrays
    or `jax.ShapeDtypeStruct`s: nothing runs."""
    latent = jax.ShapeDtypeStruct(tuple(latent_shape), jnp.float32)
    return memory_bytes(jax.jit(vae.decode).lower(params, latent).compile())


def chunked_decode_memory(vae: vae_lib.CausalVAE, params, latent_shape,
                          chunk_latent_frames: int) -> dict:
    """Bytes of `vae.decode_chunked` of a float32 latent [B, t, h, w, C]: each distinct compiled
    chunk step (`step_bytes`, in the order the clip first needs them), what stays on the device
    between steps (`resident_bytes`) and their sum at the largest step (`peak_bytes`).

    Lowers the same jitted per-chunk function `decode_chunked` runs, on the same chunks; the cache
    each step receives is the one the previous step's compiled program returns. Nothing runs."""
    step = vae_lib.chunk_fn(vae.net, vae_lib.VAENet.decode)
    b, t = latent_shape[:2]
    cache, steps = {}, {}
    for start, stop in vae.decode_chunk_bounds(t, chunk_latent_frames):
        x = jax.ShapeDtypeStruct((b, stop - start) + tuple(latent_shape[2:]), jnp.float32)
        leaves, treedef = jax.tree.flatten((cache, x))
        key = (treedef, tuple((leaf.shape, jnp.dtype(leaf.dtype)) for leaf in leaves))
        if key not in steps:
            compiled = step.lower(params["net"], cache, x).compile()
            steps[key] = memory_bytes(compiled), compiled.out_info
        out, cache = steps[key][1]
    largest_chunk = max(_nbytes(out) for _, (out, _) in steps.values())
    resident = 2 * _nbytes(jax.ShapeDtypeStruct(tuple(latent_shape), jnp.float32)) + largest_chunk
    step_bytes = [nbytes for nbytes, _ in steps.values()]
    return {"step_bytes": step_bytes, "resident_bytes": resident,
            "peak_bytes": max(step_bytes) + resident}


def sharded_programs(vae: vae_lib.CausalVAE, params, video_shape, mesh, over: str) -> dict:
    """The compiled `sharded_encode` of a float32 video [B, T, H, W, 3] and `sharded_decode` of its
    latent, split `over` frames or height on the mesh's `sequence` axis. Nothing runs."""
    video = jax.ShapeDtypeStruct(tuple(video_shape), jnp.float32)
    latent = jax.ShapeDtypeStruct((video_shape[0],) + vae.latent_shape(*video_shape[1:4]),
                                  jnp.float32)
    encode = vae_sharding.sharded_encode.lower(vae, params, video, mesh, over=over)
    decode = vae_sharding.sharded_decode.lower(vae, params, latent, mesh, over=over)
    return {"encode": encode.compile(), "decode": decode.compile()}


def _median_seconds(fn, repeats: int) -> float:
    """Median wall time of fn() over `repeats` calls, after one untimed call."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _parse_shape(text: str) -> tuple[int, int, int]:
    frames, height, width = (int(v) for v in text.lower().split("x"))
    return frames, height, width


def measure(vae: vae_lib.CausalVAE, params, frames: int, height: int, width: int, *, batch: int,
            chunk_latent_frames: int, repeats: int, shard: str | None = None) -> dict:
    """Speed and memory of one video shape; with `shard`, also the sharded memory (all devices)."""
    video = jax.random.uniform(jax.random.key(1), (batch, frames, height, width, 3), minval=-1,
                               maxval=1)
    latent_shape = (batch,) + vae.latent_shape(frames, height, width)
    encode = jax.jit(vae.encode).lower(params, video).compile()
    decode = jax.jit(vae.decode).lower(
        params, jax.ShapeDtypeStruct(latent_shape, jnp.float32)).compile()
    latent = encode(params, video)
    encode_s = _median_seconds(lambda: encode(params, video), repeats)
    decode_s = _median_seconds(lambda: decode(params, latent), repeats)
    chunked_s = _median_seconds(lambda: vae.decode_chunked(
        params, latent, chunk_latent_frames=chunk_latent_frames, to_host=True), repeats)
    decode_bytes = memory_bytes(decode)
    chunked = chunked_decode_memory(vae, params, latent_shape, chunk_latent_frames)
    sharded = {}
    if shard:
        mesh = mesh_lib.make_mesh(dict(sequence=-1))
        programs = sharded_programs(vae, params, video.shape, mesh, shard)
        whole = {"encode": encode, "decode": decode}
        temp = lambda compiled: compiled.memory_analysis().temp_size_in_bytes
        for name, compiled in programs.items():
            sharded[f"sharded_{name}_memory_bytes"] = memory_bytes(compiled)
            sharded[f"sharded_over_whole_{name}_memory"] = round(
                memory_bytes(compiled) / memory_bytes(whole[name]), 3)
            # XLA's temporaries alone: the activations, which the split divides.
            sharded[f"sharded_over_whole_{name}_temp"] = round(
                temp(compiled) / temp(whole[name]), 3)
    return {
        "frames": frames, "height": height, "width": width,
        "latent_shape": list(latent_shape),
        "encode_s": round(encode_s, 5),
        "decode_s": round(decode_s, 5),
        "chunked_decode_s": round(chunked_s, 5),
        "encode_frames_per_s": round(batch * frames / encode_s, 1),
        "decode_frames_per_s": round(batch * frames / decode_s, 1),
        "chunked_decode_frames_per_s": round(batch * frames / chunked_s, 1),
        "encode_memory_bytes": memory_bytes(encode),
        "decode_memory_bytes": decode_bytes,
        "chunked_decode_step_memory_bytes": chunked["step_bytes"],
        "chunked_decode_resident_bytes": chunked["resident_bytes"],
        "chunked_decode_memory_bytes": chunked["peak_bytes"],
        "chunked_over_whole_decode_memory": round(chunked["peak_bytes"] / decode_bytes, 3),
        **sharded,
    }


def define_flags():
    """Command-line flags, defined only when run as a program so the module imports cleanly."""
    config_flags.DEFINE_config_file("config", "configs/vae_moving_shapes.py", "VAE config file.")
    flags.DEFINE_list("shapes", ["9x16x16", "33x16x16", "65x16x16", "9x64x64", "65x64x64",
                                 "9x128x128"],
                      "Videos to measure, as FRAMESxHEIGHTxWIDTH.")
    flags.DEFINE_integer("batch", 1, "Videos per call.")
    flags.DEFINE_integer("chunk_latent_frames", 2, "Latent frames per chunk of chunked decoding.")
    flags.DEFINE_integer("repeats", 3, "Timed calls per measurement (after one warm-up call).")
    flags.DEFINE_enum("shard", None, list(vae_sharding.OVER),
                      "Also report the per-device memory of sharded encoding and decoding, the "
                      "clip split over all devices along this axis.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    vae = vae_lib.CausalVAE(**FLAGS.config.vae)
    c = vae.latent_channels
    params = {"net": vae.init_net(jax.random.key(0)),
              "shift": jnp.zeros((c,), jnp.float32), "scale": jnp.ones((c,), jnp.float32)}
    results = [measure(vae, params, *_parse_shape(s), batch=FLAGS.batch,
                       chunk_latent_frames=FLAGS.chunk_latent_frames, repeats=FLAGS.repeats,
                       shard=FLAGS.shard)
               for s in FLAGS.shapes]
    print(json.dumps({
        "benchmark": "vae",
        "platform": jax.devices()[0].platform,
        "device_kind": jax.devices()[0].device_kind,
        "jax_version": jax.__version__,
        "config": config_flags.get_config_filename(FLAGS["config"]),
        "vae": dict(FLAGS.config.vae),
        "weights": "random (init_net, seed 0; shift 0, scale 1)",
        "params_bytes": _nbytes(params),
        "batch": FLAGS.batch,
        "chunk_latent_frames": FLAGS.chunk_latent_frames,
        "repeats": FLAGS.repeats,
        "shard": FLAGS.shard,
        "devices": jax.device_count(),
        "time": "median seconds per call after compilation and one warm-up call; frames_per_s "
                "counts pixel frames (batch x frames / time)",
        "memory": "bytes from XLA's compiled memory analysis: argument + output + temp - alias "
                  "of each compiled program (arguments include params_bytes); chunked = largest "
                  "chunk step + resident (latent, its de-normalised copy, previous decoded chunk); "
                  "sharded = per device, the clip split over all devices (temp: XLA's "
                  "temporaries only)",
        "results": results,
    }, default=str))


if __name__ == "__main__":
    define_flags()
    app.run(main)
