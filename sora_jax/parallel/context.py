"""Context (sequence) parallelism: exact attention over a token sequence split along a mesh axis.

A long video's self-attention does work quadratic in its tokens, and its activations outgrow one
device. With the token axis split n ways over the `sequence` mesh axis (the logical axis `act_length`),
each device holds the queries, keys and values of L/n tokens, and one of two schemes computes the
exact attention from there:

  'ulysses'  (DeepSpeed-Ulysses, Jacobs et al. 2023) an all-to-all turns the sequence-split q, k, v
             [B, L/n, H, D] into head-split [B, L, H/n, D]; ordinary attention, on any backend, runs
             over whole sequences for H/n heads, and an all-to-all turns the result back. Needs the
             heads divisible by n; what each device sends shrinks as n grows.
  'ring'     (Ring Attention, Liu et al. 2023) each device keeps its query block and passes its
             key/value block, with the keys' segment ids, around the ring of devices (n - 1
             `ppermute`s), folding each block it holds into an online softmax (running max and sum,
             in f32) as FlashAttention does; the backward pass is a second trip around the ring.
             Any number of heads, and a device holds one block of keys and one [L/n, L/n] block of
             logits at a time, forward and backward: memory per device shrinks with n for any L.

Cross-attention to a short context that every device holds whole (the caption) needs neither: each
device's queries attend to all of it, with no communication.

Masks follow models/attention.py: packing segment ids (a query attends to a key iff their ids are
equal; 0 = padding) and key padding, and a query whose keys are all masked gets the mean of all
values. The functions here run under the mesh active at trace time (`jax.set_mesh`), as `shard_map`s
that are manual over the sequence axis only, so batch, FSDP and tensor sharding stay the compiler's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

METHODS = ("none", "ulysses", "ring")
_MASKED = -1e30  # The masked logit, as in models/attention.py: finite, so no row becomes NaN.
_UNMATCHED = -1  # The segment id of a padded-out key: no query's id (>= 0) equals it.


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown context_parallel {method!r}; valid: {', '.join(METHODS)}")


def axis_size(axis_name: str) -> int:
    """How many ways the mesh active at trace time splits `axis_name`; 1 without a mesh or the axis."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or axis_name not in mesh.axis_names:
        return 1
    return mesh.shape[axis_name]


def context_parallel_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, method: str,
                               local_attention: Callable[..., jax.Array], kv_replicated: bool = False,
                               mask: jax.Array | None = None,
                               segment_ids: tuple[jax.Array, jax.Array] | None = None,
                               scale: float | None = None, axis_name: str = "sequence") -> jax.Array:
    """Attention with q (and, unless kv_replicated, k and v) split along its length over `axis_name`.

    q: [B, Lq, H, D]; k, v: [B, Lk, H, D] (global shapes, as under jit).
    method: 'ulysses' or 'ring' (see the module docstring).
    local_attention: the attention of one device's blocks, called as
      `local_attention(q, k, v, mask=, scale=, q_segment_ids=, kv_segment_ids=)` on whole sequences
      ('ulysses') or on whole contexts (kv_replicated); 'ring' computes its own.
    kv_replicated: True when k, v are a short context that every device holds whole (cross-attention);
      the method does not matter then. False when they are split like q (self-attention).
    mask: key padding only, bool broadcastable to [B, 1, 1, Lk]; True = attend.
    segment_ids: (q_ids [B, Lq], kv_ids [B, Lk]) int, or None.
    Returns [B, Lq, H, D] in q's dtype, split like q.
    """
    check_method(method)
    if method == "none":
        raise ValueError("context_parallel_attention needs method 'ulysses' or 'ring'; for 'none' call "
                         "the attention directly")
    mesh = jax.sharding.get_abstract_mesh()
    n = axis_size(axis_name)
    if n == 1:
        raise ValueError(f"context-parallel attention needs a mesh (jax.set_mesh) whose axis "
                         f"{axis_name!r} has more than one device; the active mesh is "
                         f"{dict(mesh.shape) if not mesh.empty else 'none'}")
    (b, lq, heads, _), lk = q.shape, k.shape[1]
    key_mask = _key_padding(mask, b, lk)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    _check_divisible("q", lq, n, axis_name, "tokens", f"pad the sequence to a multiple of {n}")
    split, whole = P(None, axis_name), P()
    shard = functools.partial(jax.shard_map, mesh=mesh, out_specs=split, axis_names={axis_name},
                              check_vma=False)
    if kv_replicated:
        dtype = k.dtype

        @shard(in_specs=(split, whole, whole, whole, (split, whole)))
        def local_queries(q, k, v, key_mask, ids):
            return local_attention(q, k.astype(dtype), v.astype(dtype), mask=_as_4d(key_mask), scale=scale,
                                   q_segment_ids=ids[0], kv_segment_ids=ids[1])
        # The gradients of whole k and v are sums over the axis, which XLA:CPU fails to compile in
        # 16 bits within a shard_map manual over some axes only ("Invalid binary instruction opcode
        # copy"); the short context costs little in f32.
        wide = lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32))
        return local_queries(q, wide(k), wide(v), key_mask, segment_ids or (None, None))

    _check_divisible("k", lk, n, axis_name, "tokens", f"pad the sequence to a multiple of {n}")
    if method == "ulysses":
        _check_divisible("q", heads, n, axis_name, "heads",
                         f"use context_parallel='ring', or a number of heads divisible by {n}")

        @shard(in_specs=(split, split, split, whole, whole))
        def all_to_all(q, k, v, key_mask, ids):
            to_heads = lambda x: lax.all_to_all(x, axis_name, split_axis=2, concat_axis=1, tiled=True)
            out = local_attention(to_heads(q), to_heads(k), to_heads(v), mask=_as_4d(key_mask),
                                  scale=scale, q_segment_ids=ids[0], kv_segment_ids=ids[1])
            return lax.all_to_all(out, axis_name, split_axis=1, concat_axis=2, tiled=True)
        return all_to_all(q, k, v, key_mask, segment_ids or (None, None))

    # The ring needs one mask mechanism: key padding becomes an id that no query matches.
    if segment_ids is None and key_mask is not None:
        segment_ids = (jnp.zeros((b, lq), jnp.int32), jnp.zeros((b, lk), jnp.int32))
    if key_mask is not None:
        segment_ids = (segment_ids[0], jnp.where(key_mask, segment_ids[1], _UNMATCHED))
    q_ids, kv_ids = segment_ids or (None, None)
    ring = shard(lambda q, k, v, q_ids, kv_ids: _ring_attention(axis_name, n, scale, q, k, v, q_ids, kv_ids),
                 in_specs=(split,) * 5)
    return ring(q, k, v, q_ids, kv_ids)


# One device's part of ring attention. The backward pass is a second trip around the ring (the
# key/value blocks travel with their gradients' running sums), so that, as in the forward pass, a
# device holds one block of keys at a time and keeps only O(L/n) for the backward.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _ring_attention(axis_name, size, scale, q, k, v, q_ids, kv_ids):
    """q: [B, Lq/n, H, D]; k, v: [B, Lk/n, H, D]; q_ids [B, Lq/n] and kv_ids [B, Lk/n], or both None.
    Returns [B, Lq/n, H, D] in q's dtype."""
    return _ring_attention_fwd(axis_name, size, scale, q, k, v, q_ids, kv_ids)[0]


def _ring_attention_fwd(axis_name, size, scale, q, k, v, q_ids, kv_ids):
    def fold(carry, k, v, kv_ids):
        """Folds one key/value block into (out [B, H, Lq, D], max [B, H, Lq], sum [B, H, Lq])."""
        out, running_max, total = carry
        s = _logits(q, k, q_ids, kv_ids, scale)
        new_max = jnp.maximum(running_max, jnp.max(s, axis=-1))
        p = jnp.exp(s - new_max[..., None])
        correction = jnp.exp(running_max - new_max)
        pv = jnp.einsum("bhqk,bkhd->bhqd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return out * correction[..., None] + pv, new_max, total * correction + jnp.sum(p, axis=-1)

    def step(state, _):
        carry, block = state
        block = _passed_on(block, axis_name, size)
        return (fold(carry, *block), block), None

    b, lq, heads, d = q.shape
    # Starting from the masked logit rather than -inf, a query whose keys are all masked weighs every
    # key exp(0) = 1: the mean of all values, as unsplit attention gives.
    carry = (jnp.zeros((b, heads, lq, d), jnp.float32), jnp.full((b, heads, lq), _MASKED, jnp.float32),
             jnp.zeros((b, heads, lq), jnp.float32))
    carry = fold(carry, k, v, kv_ids)
    (carry, _), _ = lax.scan(step, (carry, (k, v, kv_ids)), length=size - 1)
    out, running_max, total = carry
    out = jnp.swapaxes(out / total[..., None], 1, 2)
    return out.astype(q.dtype), (q, k, v, q_ids, kv_ids, out, running_max, total)


def _ring_attention_bwd(axis_name, size, scale, residuals, d_out):
    """The softmax-attention backward, block by block: each key/value block collects its dk, dv from
    every device's queries on its way around the ring and arrives home with them."""
    q, k, v, q_ids, kv_ids, out, running_max, total = residuals
    d_out = d_out.astype(jnp.float32)
    delta = jnp.einsum("bqhd,bqhd->bhq", d_out, out)

    def accumulate(dq, k, v, kv_ids, dk, dv):
        p = jnp.exp(_logits(q, k, q_ids, kv_ids, scale) - running_max[..., None]) / total[..., None]
        dp = jnp.einsum("bqhd,bkhd->bhqk", d_out, v, preferred_element_type=jnp.float32)
        ds = p * (dp - delta[..., None]) * scale
        if kv_ids is not None:  # Masked logits get no gradient (p is nonzero there only in rows
            ds = jnp.where(_visible(q_ids, kv_ids), ds, 0.0)  # that see no key).
        dq = dq + jnp.einsum("bhqk,bkhd->bqhd", ds, k, preferred_element_type=jnp.float32)
        dk = dk + jnp.einsum("bhqk,bqhd->bkhd", ds, q, preferred_element_type=jnp.float32)
        dv = dv + jnp.einsum("bhqk,bqhd->bkhd", p, d_out, preferred_element_type=jnp.float32)
        return dq, dk, dv

    def step(state, _):
        dq, (k, v, kv_ids, dk, dv) = state
        dq, dk, dv = accumulate(dq, k, v, kv_ids, dk, dv)
        return (dq, _passed_on((k, v, kv_ids, dk, dv), axis_name, size)), None

    zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
    (dq, (k_n, v_n, ids_n, dk, dv)), _ = lax.scan(step, (zeros(q), (k, v, kv_ids, zeros(k), zeros(v))),
                                                  length=size - 1)
    # The last block's keys are done with; only their gradients travel on, home.
    dq, dk, dv = accumulate(dq, k_n, v_n, ids_n, dk, dv)
    dk, dv = _passed_on((dk, dv), axis_name, size)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_ring_attention.defvjp(_ring_attention_fwd, _ring_attention_bwd)


def _passed_on(block, axis_name, size):
    """Each device's block (a pytree) to the next device of the ring."""
    perm = [(i, (i + 1) % size) for i in range(size)]
    return jax.tree.map(lambda x: lax.ppermute(x, axis_name, perm), block)


def _visible(q_ids, kv_ids):
    return q_ids[:, None, :, None] == kv_ids[:, None, None, :]


def _logits(q, k, q_ids, kv_ids, scale):
    """[B, H, Lq, Lk] f32 scaled logits, _MASKED where the segment ids differ."""
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    return s if kv_ids is None else jnp.where(_visible(q_ids, kv_ids), s, _MASKED)


def _key_padding(mask, batch, length):
    """mask broadcastable to [B, 1, 1, Lk] -> bool [B, Lk], or None; ValueError for other masks."""
    if mask is None:
        return None
    mask = jnp.asarray(mask, bool)
    if mask.ndim <= 4:
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    if mask.ndim != 4 or mask.shape[1:3] != (1, 1):
        raise ValueError(f"context-parallel attention takes a mask only as key padding, [B, 1, 1, Lk], "
                         f"got {list(mask.shape)}; express other masks as segment ids, or use "
                         f"context_parallel='none'")
    return jnp.broadcast_to(mask[:, 0, 0], (batch, length))


def _as_4d(key_mask):
    return None if key_mask is None else key_mask[:, None, None, :]


def _check_divisible(name, count, n, axis_name, what, fix):
    if count % n:
        raise ValueError(f"context-parallel attention splits {name}'s {count} {what} over the {n} "
                         f"devices of mesh axis {axis_name!r}, which needs {n} to divide {count}; {fix}")
