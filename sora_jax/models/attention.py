"""The one attention entry point: softmax(q k^T / sqrt(d)) v on [batch, length, heads, head_dim] arrays.

The backends compute the same function; the config picks one per platform:
  'xla'    `jax.nn.dot_product_attention` lowered by XLA: the portable reference, on any platform.
  'cpu'    einsums in a (batch*heads, tokens, head_dim) layout with f32 accumulation and a hand-written
           backward, so that every matmul, forward and backward, is a bf16 x bf16 -> f32 product (f32
           x f32 for f32 inputs) in a layout the CPU's fast matmul library takes.
  'cudnn'  cuDNN's fused kernel (GPU only).
  'splash' the Pallas splash-attention kernel: native on TPU, elsewhere run by the Pallas interpreter
           (slow; for tests). It takes segment ids and key padding, no other mask and no bias. XLA
           cannot split a kernel over devices: given the layout of q, k and v over the active mesh
           (`spec`), it runs under `shard_map`, one kernel per device on that device's examples
           and heads, with no all-gather.
Softmax is computed in f32. Masked logits get a large finite negative value, so a query whose keys are
all masked gets the mean of all values ('splash': of the values padded to its block size) rather than NaN.

Packing (NaViT): several clips share one sequence, each token carrying a segment id (the clip's index,
>= 1; 0 = padding). A query attends to a key iff their segment ids are equal and `mask` allows it, which
makes self-attention block-diagonal and sends each clip's cross-attention to its own caption's tokens.
Padding queries (id 0) thus attend to the padding keys only; their outputs are meaningless but finite,
and the loss must mask them.

Context parallelism (parallel/context.py): with `context_parallel` 'ulysses' or 'ring' and a mesh active
at trace time that splits `sequence_axis` over more than one device, the sequence is split along it and
the result is the same function.
"""

import functools
import math

import einops
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from sora_jax.parallel import context

BACKENDS = ("xla", "cpu", "cudnn", "splash")
_MASKED = -1e30
# Splash: the segment id of keys no query may attend to (masked keys, padding to the kernel's blocks),
# and the block granularity: it compares segment ids a vector register (128 lanes) at a time.
_UNMATCHED = -1
_SPLASH_LANES = 128


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
              bias: jax.Array | None = None, scale: float | None = None,
              q_segment_ids: jax.Array | None = None, kv_segment_ids: jax.Array | None = None,
              backend: str = "xla", context_parallel: str = "none", kv_replicated: bool = False,
              sequence_axis: str = "sequence", spec: P | None = None) -> jax.Array:
    """Multi-head attention.

    q: [B, Lq, H, D]; k, v: [B, Lk, H, D], all of one dtype.
    mask: bool, broadcastable to [B, H, Lq, Lk] (e.g. [B, 1, 1, Lk] for key padding); True = attend.
      'splash' takes key padding only.
    bias: float, broadcastable to [B, H, Lq, Lk], added to the scaled logits (e.g. T5's relative
      position bias); 'xla' and 'cudnn' only.
    scale: the logits' factor, 1/sqrt(D) when None (T5 uses 1.0).
    q_segment_ids: int [B, Lq], non-negative; kv_segment_ids: int [B, Lk], q_segment_ids when None
      (self-attention). A query attends to a key iff their ids are equal (see the module docstring).
    context_parallel: 'none', 'ulysses' or 'ring' (parallel/context.py). Under a mesh whose axis
      `sequence_axis` has n > 1 devices, q is split along its length over it, and so are k and v unless
      kv_replicated (a short context every device holds whole, as in cross-attention to text). Takes
      no bias, and a mask only as key padding. Without such a mesh it changes nothing.
    spec: the PartitionSpec of q, k and v [B, L, H, D] over the active mesh, as the caller laid them
      out (e.g. `nn.logical_to_mesh_axes` of their logical axes). 'splash' splits its kernel over
      the mesh axes of the batch and heads entries (those that divide them); the others ignore it.
      None: 'splash' runs on whole arrays, which XLA gathers onto every device.
    Returns [B, Lq, H, D] in q's dtype.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; valid: {', '.join(BACKENDS)}")
    context.check_method(context_parallel)
    segment_ids = _checked_segment_ids(q, k, q_segment_ids, kv_segment_ids)
    if context_parallel != "none" and context.axis_size(sequence_axis) > 1:
        if bias is not None:
            raise ValueError(f"context_parallel={context_parallel!r} takes no bias; use "
                             f"context_parallel='none'")
        return context.context_parallel_attention(
            q, k, v, method=context_parallel,
            local_attention=functools.partial(attention, backend=backend, spec=spec),
            kv_replicated=kv_replicated, mask=mask, segment_ids=segment_ids, scale=scale,
            axis_name=sequence_axis)
    if backend == "splash":
        if bias is not None:
            raise ValueError("attention backend 'splash' takes no bias; use 'xla' or 'cudnn'")
        return _splash_attention(q, k, v, mask, segment_ids,
                                 q.shape[-1] ** -0.5 if scale is None else scale, spec)
    if segment_ids is not None:
        same = segment_ids[0][:, None, :, None] == segment_ids[1][:, None, None, :]
        mask = same if mask is None else jnp.logical_and(mask, same)
    if backend == "xla":
        return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale,
                                            implementation="xla")
    if backend == "cpu":
        if bias is not None:
            raise ValueError("attention backend 'cpu' takes no bias; use 'xla'")
        return _cpu_attention(q, k, v, mask, q.shape[-1] ** -0.5 if scale is None else scale)
    if jax.default_backend() != "gpu":
        raise ValueError(f"attention backend 'cudnn' needs a GPU, but JAX runs on "
                         f"{jax.default_backend()!r}; use 'xla' (any platform) or 'cpu' (fast on CPU)")
    # cuDNN's kernel takes 16-bit inputs only.
    dtype = q.dtype if q.dtype in (jnp.bfloat16, jnp.float16) else jnp.bfloat16
    out = jax.nn.dot_product_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype), bias=bias,
                                       mask=mask, scale=scale, implementation="cudnn")
    return out.astype(q.dtype)


def _checked_segment_ids(q, k, q_ids, kv_ids):
    """(q_ids [B, Lq], kv_ids [B, Lk]) int32, or None without segment ids; ValueError on bad shapes."""
    if q_ids is None:
        if kv_ids is not None:
            raise ValueError("kv_segment_ids given without q_segment_ids; pass both (or only "
                             "q_segment_ids, for self-attention)")
        return None
    if kv_ids is None:
        if q.shape[1] != k.shape[1]:
            raise ValueError(f"q_segment_ids alone means self-attention, but q has {q.shape[1]} tokens "
                             f"and k {k.shape[1]}; pass kv_segment_ids for cross-attention")
        kv_ids = q_ids
    for name, ids, x in (("q_segment_ids", q_ids, q), ("kv_segment_ids", kv_ids, k)):
        ids = jnp.asarray(ids)
        if ids.shape != x.shape[:2] or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"{name} must be int [batch, length] = {list(x.shape[:2])}, "
                             f"got {ids.dtype} {list(ids.shape)}")
    return jnp.asarray(q_ids, jnp.int32), jnp.asarray(kv_ids, jnp.int32)


def _splash_attention(q, k, v, mask, segment_ids, scale, spec):
    """The splash kernel on whole sequences, per shard of batch and heads under `spec` (see
    `attention`); a key-padding mask and block padding become segment ids no query matches."""
    ids = _splash_segment_ids(q, k, mask, segment_ids)
    batch, heads = _splash_shards(spec, q.shape)
    local = functools.partial(_splash_local, scale=scale)
    if not batch + heads:
        return local(q, k, v, ids)
    x, rows = P(batch or None, None, heads or None, None), P(batch or None, None)
    # Inside context parallelism's shard_map this one is manual over the other axes as well.
    return jax.shard_map(local, in_specs=(x, x, x, (rows, rows)), out_specs=x,
                         axis_names=set(batch + heads), check_vma=False)(q, k, v, ids)


def _splash_segment_ids(q, k, mask, segment_ids):
    """(q_ids [B, Lq], kv_ids [B, Lk]): every token id 0 without segment ids, and the id _UNMATCHED
    on the keys a key-padding mask masks."""
    (b, lq), lk = q.shape[:2], k.shape[1]
    q_ids, kv_ids = segment_ids or (jnp.zeros((b, lq), jnp.int32), jnp.zeros((b, lk), jnp.int32))
    if mask is not None:
        mask = jnp.asarray(mask, bool)
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
        if mask.ndim != 4 or mask.shape[1:3] != (1, 1):
            raise ValueError(f"attention backend 'splash' takes a mask only as key padding, "
                             f"[B, 1, 1, Lk], got {list(mask.shape)}; express other masks as segment "
                             f"ids, or use 'xla'")
        kv_ids = jnp.where(jnp.broadcast_to(mask[:, 0, 0], kv_ids.shape), kv_ids, _UNMATCHED)
    return q_ids, kv_ids


def _splash_shards(spec, shape):
    """The mesh axes to split the kernel's batch and heads over: those of `spec`'s entries for them
    that are automatic in the active mesh (not already manual, as in a shard_map) with more than one
    device, when together they divide the dimension; otherwise none for that dimension."""
    mesh = jax.sharding.get_abstract_mesh()
    if spec is None or mesh.empty:
        return (), ()
    auto = {name for name, kind in zip(mesh.axis_names, mesh.axis_types)
            if kind != jax.sharding.AxisType.Manual and mesh.shape[name] > 1}

    def axes(entry, size):
        names = (entry,) if isinstance(entry, str) else tuple(entry or ())
        names = tuple(name for name in names if name in auto)
        return names if size % math.prod(mesh.shape[name] for name in names) == 0 else ()

    spec = tuple(spec) + (None,) * (4 - len(spec))
    return axes(spec[0], shape[0]), axes(spec[2], shape[2])


def _splash_local(q, k, v, ids, *, scale):
    """The kernel on one device's [B, L, H, D] blocks, the sequences padded to its 128-token blocks
    (the queries added are cut off again)."""
    (_, lq, heads, _), lk = q.shape, k.shape[1]
    lq_padded, lk_padded = _round_up(lq, _SPLASH_LANES), _round_up(lk, _SPLASH_LANES)
    to_rows = lambda x, length: jnp.pad(einops.rearrange(x, "b l h d -> b h l d"),
                                        ((0, 0), (0, 0), (0, length - x.shape[1]), (0, 0)))
    ids = splash.SegmentIds(
        q=jnp.pad(ids[0], ((0, 0), (0, lq_padded - lq)), constant_values=_UNMATCHED),
        kv=jnp.pad(ids[1], ((0, 0), (0, lk_padded - lk)), constant_values=_UNMATCHED))
    kernel = _splash_kernel(heads, lq_padded, lk_padded, jax.default_backend() != "tpu")
    # The kernel takes no scale: scaling q spares a pass over the logits anyway.
    out = jax.vmap(kernel)(to_rows((q * scale).astype(q.dtype), lq_padded), to_rows(k, lk_padded),
                           to_rows(v, lk_padded), ids)
    return einops.rearrange(out[:, :, :lq], "b h l d -> b l h d").astype(q.dtype)


def _round_up(n, multiple):
    return -(-n // multiple) * multiple


def _splash_kernel(heads, lq, lk, interpret):
    """The splash kernel for [heads, lq, D] queries and [heads, lk, D] keys, lq and lk multiples of 128,
    with no mask but the segment ids; blocks of up to 512 tokens."""
    block = lambda length: max(b for b in (128, 256, 512) if length % b == 0)
    bq, bkv = block(lq), block(lk)
    sizes = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                              block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
    mask = splash.MultiHeadMask([splash.FullMask((lq, lk))] * heads)
    # Built per trace (its tables become arrays of that trace); splash caches the mask analysis itself.
    return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                  interpret=interpret)


def _cpu_attention(q, k, v, mask, scale):
    heads = q.shape[2]
    dtype = jnp.float32 if q.dtype == jnp.float32 else jnp.bfloat16  # of the matmuls' operands
    rows = lambda x: _pinned(einops.rearrange(x.astype(dtype), "b l h d -> (b h) l d"))
    # Scaling q rather than the logits spares a pass over the [tokens, tokens] arrays.
    scaled_q = q.astype(jnp.float32) * scale
    mask = None if mask is None else jnp.asarray(mask, bool)
    out = _rows_attention(rows(scaled_q), rows(k), rows(v), mask, heads)
    return einops.rearrange(out, "(b h) l d -> b l h d", h=heads).astype(q.dtype)


def _pinned(x):
    """x: [N, A, B], held in row-major layout.

    XLA otherwise folds a neighbouring transpose into the layout of a dot's operand or result, which the
    fast bf16 matmul does not take: the dot then runs as a slow f32 one, or fails at run time
    ("Unsupported element type for DotThunk::Execute"). Through a barrier as a flattened matrix, the
    array can only be row-major.
    """
    n, a, b = x.shape
    return lax.optimization_barrier(x.reshape(n * a, b)).reshape(n, a, b)


def _transposed(x):
    """x: [N, A, B] -> [N, B, A], as a row-major copy (see `_pinned`)."""
    return _pinned(jnp.swapaxes(_pinned(x), 1, 2))


def _einsum(spec, a, b):
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _masked(x, mask, heads, fill):
    """x: [B*H, Lq, Lk], with fill where mask (broadcastable to [B, H, Lq, Lk]) is False."""
    if mask is None:
        return x
    return jnp.where(mask, x.reshape(-1, heads, *x.shape[1:]), fill).reshape(x.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _rows_attention(q, k, v, mask, heads):
    return _rows_attention_fwd(q, k, v, mask, heads)[0]


def _rows_attention_fwd(q, k, v, mask, heads):
    """softmax(q k^T) v for q: [B*H, Lq, D] (already scaled) and k, v: [B*H, Lk, D], all bf16 or
    all f32. Returns ([B*H, Lq, D] f32, residuals)."""
    s = _masked(_einsum("nqd,nkd->nqk", q, k), mask, heads, _MASKED)
    p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    p = (p / jnp.sum(p, axis=-1, keepdims=True)).astype(q.dtype)
    out = _pinned(_einsum("nqk,nkd->nqd", p, v))
    return out, (q, k, v, mask, p, out)


def _rows_attention_bwd(heads, residuals, d_out):
    """The softmax-attention backward. The two products that contract over queries (dk = ds^T q,
    dv = p^T do) are computed transposed (dk^T = q^T ds), so that only [tokens, head_dim] arrays,
    never [tokens, tokens] ones, need transposed copies."""
    q, k, v, mask, p, out = residuals
    d_out_q = _pinned(d_out.astype(q.dtype))  # in the operands' dtype
    dp = _einsum("nqd,nkd->nqk", d_out_q, v)
    ds = p.astype(jnp.float32) * (dp - jnp.sum(d_out * out, axis=-1, keepdims=True))
    # Masked logits get no gradient (p is only nonzero there in rows with no visible key).
    ds = _masked(ds, mask, heads, 0.0).astype(q.dtype)
    dq = _pinned(_einsum("nqk,nkd->nqd", ds, k))
    dk = _transposed(_einsum("ndq,nqk->ndk", _transposed(q), ds))
    dv = _transposed(_einsum("ndq,nqk->ndk", _transposed(d_out_q), p))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_rows_attention.defvjp(_rows_attention_fwd, _rows_attention_bwd)
