"""The one attention entry point: softmax(q k^T / sqrt(d)) v on [batch, length, heads, head_dim] arrays.

The backends compute the same function; the config picks one per platform:
  'xla'    `jax.nn.dot_product_attention` lowered by XLA: the portable reference, on any platform.
  'cpu'    einsums in a (batch*heads, tokens, head_dim) layout with bf16 operands, f32 accumulation and a
           hand-written backward, so that every matmul, forward and backward, is a bf16 x bf16 -> f32
           product in a layout the CPU's fast matmul library takes.
  'cudnn'  cuDNN's fused kernel (GPU only).
Softmax is computed in f32. Masked logits get a large finite negative value, so a query whose keys are
all masked gets the mean of all values rather than NaN.
"""

import functools

import einops
import jax
import jax.numpy as jnp
from jax import lax

BACKENDS = ("xla", "cpu", "cudnn")
_MASKED = -1e30


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
              bias: jax.Array | None = None, scale: float | None = None,
              backend: str = "xla") -> jax.Array:
    """Multi-head attention.

    q: [B, Lq, H, D]; k, v: [B, Lk, H, D], all of one dtype.
    mask: bool, broadcastable to [B, H, Lq, Lk] (e.g. [B, 1, 1, Lk] for key padding); True = attend.
    bias: float, broadcastable to [B, H, Lq, Lk], added to the scaled logits (e.g. T5's relative
      position bias); 'xla' and 'cudnn' only.
    scale: the logits' factor, 1/sqrt(D) when None (T5 uses 1.0).
    Returns [B, Lq, H, D] in q's dtype.
    """
    if backend == "xla":
        return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale,
                                            implementation="xla")
    if backend == "cpu":
        if bias is not None:
            raise ValueError("attention backend 'cpu' takes no bias; use 'xla'")
        return _cpu_attention(q, k, v, mask, q.shape[-1] ** -0.5 if scale is None else scale)
    if backend == "cudnn":
        if jax.default_backend() != "gpu":
            raise ValueError(f"attention backend 'cudnn' needs a GPU, but JAX runs on "
                             f"{jax.default_backend()!r}; use 'xla' (any platform) or 'cpu' (fast on CPU)")
        # cuDNN's kernel takes 16-bit inputs only.
        dtype = q.dtype if q.dtype in (jnp.bfloat16, jnp.float16) else jnp.bfloat16
        out = jax.nn.dot_product_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype), bias=bias,
                                           mask=mask, scale=scale, implementation="cudnn")
        return out.astype(q.dtype)
    raise ValueError(f"unknown attention backend {backend!r}; valid: {', '.join(BACKENDS)}")


def _cpu_attention(q, k, v, mask, scale):
    heads = q.shape[2]
    rows = lambda x: _pinned(einops.rearrange(x.astype(jnp.bfloat16), "b l h d -> (b h) l d"))
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
    """softmax(q k^T) v for q: [B*H, Lq, D] (already scaled) and k, v: [B*H, Lk, D], all bf16.
    Returns ([B*H, Lq, D] f32, residuals)."""
    s = _masked(_einsum("nqd,nkd->nqk", q, k), mask, heads, _MASKED)
    p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    p = (p / jnp.sum(p, axis=-1, keepdims=True)).astype(jnp.bfloat16)
    out = _pinned(_einsum("nqk,nkd->nqd", p, v))
    return out, (q, k, v, mask, p, out)


def _rows_attention_bwd(heads, residuals, d_out):
    """The softmax-attention backward. The two products that contract over queries (dk = ds^T q,
    dv = p^T do) are computed transposed (dk^T = q^T ds), so that only [tokens, head_dim] arrays,
    never [tokens, tokens] ones, need transposed copies."""
    q, k, v, mask, p, out = residuals
    d_out16 = _pinned(d_out.astype(jnp.bfloat16))
    dp = _einsum("nqd,nkd->nqk", d_out16, v)
    ds = p.astype(jnp.float32) * (dp - jnp.sum(d_out * out, axis=-1, keepdims=True))
    # Masked logits get no gradient (p is only nonzero there in rows with no visible key).
    ds = _masked(ds, mask, heads, 0.0).astype(jnp.bfloat16)
    dq = _pinned(_einsum("nqk,nkd->nqd", ds, k))
    dk = _transposed(_einsum("ndq,nqk->ndk", _transposed(q), ds))
    dv = _transposed(_einsum("ndq,nqk->ndk", _transposed(d_out16), p))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_rows_attention.defvjp(_rows_attention_fwd, _rows_attention_bwd)
