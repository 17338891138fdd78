"""Device memory of a DiT training step, estimated before anything is compiled.

Per device, in bytes, from the abstract TrainState (each array's shape and the shard of it a device
holds under the sharding its logical axes get on the mesh) and a model of the activations the
backward pass keeps:

  params, ema_params, opt_state  the state's shards (f32 parameters, their EMA, AdamW's moments)
  gradients   one f32 copy of the parameter shards; two with gradient accumulation (the running
              sum and a microbatch's)
  batch       the device's share of the step's inputs
  activations what the backward pass keeps, below

Activations. A device holds b rows (the batch / the ways `act_batch` splits it / grad_accum_steps)
of l tokens (the row length L / the ways `act_length` splits it), h heads and f MLP features (the
heads and hidden width / the ways t and `act_mlp` split them), width W whole. Queries attend to
L tokens at once (the row length; l with context_parallel='ring', whose blocks of keys travel) and
Lc caption tokens. c is the byte size of the compute dtype, o that of a matmul
output (4 with matmul='bf16' or f32 compute, else c), m = 1 for matmul='bf16' (it keeps bf16
copies of its operands too). Per token and block, in bytes, autodiff records
(`jax.ad_checkpoint.saved_residuals`, counted by tensor):

  N = (44 + 7c + 24m) W + (36 + 6c) W/t + (20 + c) f + 40 h     everything but attention
  A = h (L + Lc)                                                 attention (query, key) pairs

and a scanned block stores for the backward pass, by remat policy,

  'full'  S = 4 W                                 its input
  'dots'  S = 4 W + o (5 W + 4 W/t + f) + p A     the input and the matmul outputs
  'none'  S = 1.2 (N + q A)                       everything; XLA's loop keeps about a fifth more
                                                  than autodiff records (measured 12-27%)

with p, q the bytes per pair: 'xla' keeps f32 logits and the probabilities in the compute dtype
(p = q = 4 + c); 'cpu' keeps f32 logits under 'dots' (p = 4) and under 'none' probabilities, which
autodiff records in bf16 and XLA keeps in f32 (q = 4); flash kernels ('splash', 'cudnn') none.
Within one XLA computation fusion keeps less: the backward pass of one block holds
F = 0.6 N + r h L, r = 12 + c for 'xla' (f32 logits, probabilities and a cotangent at once) and
c + 1 for 'cpu'. With T = 4 (3 W + f) for the cotangents in flight and depth D:

  scan_layers=True   activations = b l (D S + F + T)
  scan_layers=False  activations = b l (D F + T)    XLA sees the whole step; on the CPU it
                                                    schedules each recomputation beside the forward
                                                    pass, so every policy keeps what 'none' does

The 0.6, the 1.2 and r were fitted to XLA's `memory_analysis()` of compiled train steps on the CPU
(benchmarks/memory.py, whose README has the validation: the whole-step estimate against XLA's
figure at sizes it was not fitted to). On TPU, where unrolled blocks honour the remat policy, the
unrolled figure is an upper bound.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sora_jax.models.dit import DiT

GiB = 2**30


def shard_bytes(shape, dtype, spec, mesh_shape: Mapping[str, int]) -> int:
    """Bytes of the largest shard of an array of `shape` under the mesh-axis PartitionSpec `spec`."""
    dims = list(shape)
    for i, axes in enumerate(tuple(spec)[:len(dims)]):
        if axes is None:
            continue
        ways = math.prod(mesh_shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
        dims[i] = -(-dims[i] // ways)
    return math.prod(dims) * jnp.dtype(dtype).itemsize


def tree_bytes(abstract, shardings, mesh_shape: Mapping[str, int]) -> int:
    """Per-device bytes of a pytree of ShapeDtypeStructs under a matching pytree of NamedShardings."""
    leaves = jax.tree.leaves(abstract)
    specs = [s.spec for s in jax.tree.leaves(shardings)]
    if len(leaves) != len(specs):
        raise ValueError(f"{len(leaves)} arrays but {len(specs)} shardings; pass matching trees.")
    return sum(shard_bytes(x.shape, x.dtype, spec, mesh_shape) for x, spec in zip(leaves, specs))


def ways(rules, logical_name: str, mesh_shape: Mapping[str, int]) -> int:
    """How many ways the mesh splits the logical axis `logical_name` under `rules`."""
    axes = nn.logical_to_mesh_axes((logical_name,), rules)[0]
    if axes is None:
        return 1
    return math.prod(mesh_shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def block_bytes_per_token(model, *, keys: int, text_keys: int, head_ways: int = 1,
                          mlp_ways: int = 1) -> dict[str, float]:
    """Bytes per token of one DiT block: `stored` (S of the module docstring, for the model's
    remat policy), `fused` (F) and `cotangents` (T). keys: tokens a query attends to (the row
    length); text_keys: caption tokens per row; head_ways, mlp_ways: how many ways tensor
    parallelism splits the heads and the MLP."""
    w, t = model.width, head_ways
    f = int(model.width * model.mlp_ratio) / mlp_ways
    h = model.num_heads / head_ways
    c = jnp.dtype(model.dtype).itemsize
    o = 4 if model.matmul == "bf16" or c == 4 else c
    m = 1 if model.matmul == "bf16" else 0
    # Bytes per head and (query, key) pair kept by 'none' (q), by 'dots' (p), and live in one
    # block's backward pass (r); flash kernels ('splash', 'cudnn') keep none.
    q, p, r = {"xla": (4 + c, 4 + c, 12 + c), "cpu": (4, 4, c + 1)}.get(
        model.attention_backend, (0, 0, 0))
    attended = h * (keys + text_keys)
    tokenwise = (44 + 7 * c + 24 * m) * w + (36 + 6 * c) * w / t + (20 + c) * f + 40 * h
    stored = {
        "full": 4 * w,
        "dots": 4 * w + o * (5 * w + 4 * w / t + f) + p * attended,
        "none": 1.2 * (tokenwise + q * attended),
    }
    return {"stored": stored[model.remat_policy],
            "fused": 0.6 * tokenwise + r * h * keys,
            "cotangents": 4 * (3 * w + f)}


def _row_geometry(exp) -> tuple[int, int, int]:
    """(rows, tokens per row, caption tokens per row) of a step's global batch."""
    shapes = exp.batch_shapes()
    if "tokens" in shapes:  # packed rows: every clip slot's caption is a key of cross-attention
        rows, length = shapes["tokens"].shape[:2]
        return rows, length, shapes["text"].shape[1] * shapes["text"].shape[2]
    return shapes["latent"].shape[0], exp.tokens_per_example(), shapes["text"].shape[1]


def estimate(exp, mesh_shape: Mapping[str, int] | None = None, abstract_state=None) -> dict[str, Any]:
    """Per-device memory of `exp`'s training step (bytes), as the module docstring models it.

    exp: a built experiment; for those of other models than the text-to-video `DiT` only the
      state, gradients and batch are estimated, and 'activations' is None.
    mesh_shape: {axis: size} of the mesh to estimate for (default: the experiment's own), so a
      config can be sized for a slice it is not running on; the shardings are the experiment's
      logical ones, placed on this mesh.
    abstract_state: `exp.abstract_state()`, if already at hand.
    Returns bytes for params, ema_params, opt_state, gradients, batch, activations and total, and
    the layout they assume: devices, rows and tokens per device, remat policy, scan.
    """
    mesh_shape = dict(exp.mesh.shape if mesh_shape is None else mesh_shape)
    unknown = set(mesh_shape) - set(exp.mesh.axis_names)
    if unknown:
        raise ValueError(f"mesh_shape names axes {sorted(unknown)} the experiment's mesh does not "
                         f"have; valid: {list(exp.mesh.axis_names)}.")
    state = exp.abstract_state() if abstract_state is None else abstract_state
    shardings = exp.state_shardings
    params = opt = ema = 0
    for name, group in state.groups.items():
        params += tree_bytes(group.params, shardings.groups[name].params, mesh_shape)
        opt += tree_bytes(group.opt_state, shardings.groups[name].opt_state, mesh_shape)
        if group.ema_params is not None:
            ema += tree_bytes(group.ema_params, shardings.groups[name].ema_params, mesh_shape)
    accumulate = exp.config.optim.get("grad_accum_steps", 1)
    gradients = params * (2 if accumulate > 1 else 1)
    shapes = exp.batch_shapes()
    batch_ways = ways(exp.rules, "act_batch", mesh_shape)
    batch = sum(-(-s.shape[0] // batch_ways) * math.prod(s.shape[1:]) * jnp.dtype(s.dtype).itemsize
                for s in shapes.values())
    out = {"params": params, "ema_params": ema, "opt_state": opt, "gradients": gradients,
           "batch": batch, "activations": None, "devices": math.prod(mesh_shape.values()),
           "mesh": mesh_shape}
    model = getattr(exp, "model", None)
    if isinstance(model, DiT):
        rows, length, text_keys = _row_geometry(exp)
        b = -(-rows // batch_ways) / accumulate
        l = -(-length // ways(exp.rules, "act_length", mesh_shape))
        # A ring passes the keys around in blocks of l; otherwise a query sees all of them at once.
        ring = getattr(model, "context_parallel", "none") == "ring"
        per_token = block_bytes_per_token(
            model, keys=l if ring else length, text_keys=text_keys,
            head_ways=ways(exp.rules, "act_heads", mesh_shape),
            mlp_ways=ways(exp.rules, "act_mlp", mesh_shape))
        if model.scan_layers:
            kept = model.depth * per_token["stored"] + per_token["fused"]
        else:
            kept = model.depth * per_token["fused"]
        out.update(activations=int(b * l * (kept + per_token["cotangents"])), rows_per_device=b,
                   tokens_per_device=l, remat_policy=model.remat_policy,
                   scan_layers=model.scan_layers)
    out["total"] = params + ema + opt + gradients + batch + (out["activations"] or 0)
    return out


def _readable(n: float, unit: str, base: int) -> str:
    """n with the largest prefix (k, M, G, T: powers of base; Ki, Mi, ... for 1024) that keeps it
    at least 1."""
    for power in (4, 3, 2, 1):
        if n >= base**power:
            prefix = "kMGT"[power - 1] if base == 1000 else "KMGT"[power - 1] + "i"
            return f"{n / base**power:.3g} {prefix}{unit}"
    return f"{n:.3g} {unit}"


def summary(exp, abstract_state=None) -> str:
    """One log line: the estimate per device, and the model's FLOPs per example where known."""
    e = estimate(exp, abstract_state=abstract_state)
    size = lambda key: _readable(e[key], "B", 1024)
    parts = [f"params {size('params')}", f"EMA {size('ema_params')}",
             f"optimizer {size('opt_state')}", f"gradients {size('gradients')}",
             f"batch {size('batch')}"]
    if e["activations"] is not None:
        parts.append(f"activations {size('activations')} (remat {e['remat_policy']!r}, "
                     f"{'scanned' if e['scan_layers'] else 'unrolled'} blocks, "
                     f"{e['rows_per_device']:g} rows x {e['tokens_per_device']} tokens)")
    else:
        parts.append("activations not modelled")
    line = f"Estimated memory per device: {size('total')} = " + " + ".join(parts)
    stats = jax.local_devices()[0].memory_stats() or {}
    if stats.get("bytes_limit"):
        line += f", of {_readable(stats['bytes_limit'], 'B', 1024)}"
    if isinstance(getattr(exp, "model", None), DiT):
        flops = exp.model.flops_per_example(exp.latent_shape[:3], exp.config.text.max_length)
        line += (f"; forward {_readable(flops, 'FLOP', 1000)} per example of "
                 f"{'x'.join(map(str, exp.latent_shape[:3]))} latents")
    return line + "."
