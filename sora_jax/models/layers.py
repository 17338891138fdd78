"""Building blocks shared by the models: the matmul entry point, dense layers with logical axis names,
f32 norms, timestep embeddings, adaLN modulation and the transformer MLP.

Parameters are always f32 and carry logical axis names (`nn.with_logical_partitioning`); a config's
logical-axis rules map those names onto mesh axes, so no module here knows about a mesh.
"""

import functools
import math
from collections.abc import Sequence
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

MATMULS = ('default', 'bf16')


def _bf16_dot(lhs, rhs, dimension_numbers):
  return lax.dot_general(lhs.astype(jnp.bfloat16), rhs.astype(jnp.bfloat16), dimension_numbers,
                         preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _bf16_dot_general(lhs, rhs, dimension_numbers, lhs_dtype, rhs_dtype):
  return _bf16_dot(lhs, rhs, dimension_numbers)


def _bf16_dot_general_fwd(lhs, rhs, dimension_numbers, lhs_dtype, rhs_dtype):
  lhs, rhs = lhs.astype(jnp.bfloat16), rhs.astype(jnp.bfloat16)
  return _bf16_dot(lhs, rhs, dimension_numbers), (lhs, rhs)


def _bf16_dot_general_bwd(dimension_numbers, lhs_dtype, rhs_dtype, residuals, g):
  """Both gradient matmuls as bf16 x bf16 -> f32, each laid out as `dot_general` lays out its output
  ([batch, free dims of the first operand, free dims of the second]) and then permuted into place."""
  lhs, rhs = residuals
  g = g.astype(jnp.bfloat16)
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  lhs_free = [d for d in range(lhs.ndim) if d not in lhs_contract and d not in lhs_batch]
  rhs_free = [d for d in range(rhs.ndim) if d not in rhs_contract and d not in rhs_batch]
  # Axes of g: batch, then lhs free, then rhs free.
  g_batch = list(range(len(lhs_batch)))
  g_lhs = [len(g_batch) + i for i in range(len(lhs_free))]
  g_rhs = [len(g_batch) + len(lhs_free) + i for i in range(len(rhs_free))]

  # d lhs = g . rhs over rhs's free axes -> [batch, lhs free, rhs contracted (ascending)].
  d_lhs = _bf16_dot(g, rhs, ((g_rhs, rhs_free), (g_batch, rhs_batch)))
  lhs_order = list(lhs_batch) + lhs_free + [lhs_contract[i] for i in np.argsort(rhs_contract)]
  d_lhs = jnp.transpose(d_lhs, np.argsort(lhs_order))

  # d rhs = lhs . g over lhs's free axes -> [batch, lhs contracted (ascending), rhs free].
  d_rhs = _bf16_dot(lhs, g, ((lhs_free, g_lhs), (lhs_batch, g_batch)))
  rhs_order = list(rhs_batch) + [rhs_contract[i] for i in np.argsort(lhs_contract)] + rhs_free
  d_rhs = jnp.transpose(d_rhs, np.argsort(rhs_order))
  return d_lhs.astype(lhs_dtype), d_rhs.astype(rhs_dtype)


_bf16_dot_general.defvjp(_bf16_dot_general_fwd, _bf16_dot_general_bwd)


def bf16_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """`lax.dot_general` with bf16 operands and f32 results, forward and backward.

  Plain autodiff would hand the backward matmuls an f32 cotangent, and on CPU a mixed bf16/f32 matmul
  runs at f32 speed or slower; casting the cotangent to bf16 keeps all three matmuls of a layer on the
  fast bf16 x bf16 -> f32 path. Gradients return in the operands' own dtypes (f32 for f32 kernels).
  """
  del precision, preferred_element_type  # The precision is this function's whole point.
  dimension_numbers = jax.tree.map(int, dimension_numbers)
  return _bf16_dot_general(lhs, rhs, dimension_numbers, jnp.dtype(lhs.dtype), jnp.dtype(rhs.dtype))


def dense_dot_general(kind: str) -> Callable[..., jax.Array]:
  """The matmul behind every dense layer: 'default' (XLA's own) or 'bf16' (`bf16_dot_general`)."""
  if kind == 'default':
    return lax.dot_general
  if kind == 'bf16':
    return bf16_dot_general
  raise ValueError(f'unknown matmul {kind!r}; valid: {", ".join(MATMULS)}')


def _no_promotion(*args, dtype=None, inexact=True):
  del dtype, inexact
  return list(args)


def dense(features: int | Sequence[int], kernel_axes: Sequence[str | None], *, axis: int | Sequence[int] = -1,
          use_bias: bool = True, kernel_init: Callable = nn.initializers.xavier_uniform(),
          dtype: Any = None, matmul: str = 'default', name: str | None = None) -> nn.DenseGeneral:
  """A `nn.DenseGeneral` whose kernel and bias carry logical axis names.

  kernel_axes: one name per kernel axis, contracted axes first, then `features` axes.
  dtype: compute dtype; with matmul='bf16' the matmul casts its operands itself, so the layer hands
    them over unconverted and the f32 kernel's gradient comes back accumulated in f32.
  """
  n_out = 1 if isinstance(features, int) else len(features)
  return nn.DenseGeneral(
      features, axis=axis, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
      kernel_init=nn.with_logical_partitioning(kernel_init, tuple(kernel_axes)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), tuple(kernel_axes[-n_out:])),
      dot_general=dense_dot_general(matmul),
      promote_dtype=_no_promotion if matmul == 'bf16' else nn.dtypes.promote_dtype,
      name=name)


class LayerNorm(nn.Module):
  """LayerNorm over the last axis, computed and returned in f32 (bf16 statistics are inaccurate, and
  slow on CPU). Without a learned scale and bias when the scale comes from adaLN modulation."""
  use_scale: bool = True
  axis_name: str = 'embed'
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x):
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    y = (x - mean) * lax.rsqrt(var + self.epsilon)
    if self.use_scale:
      names = (self.axis_name,)
      y = y * self.param('scale', nn.with_logical_partitioning(nn.initializers.ones_init(), names), x.shape[-1:])
      y = y + self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros_init(), names), x.shape[-1:])
    return y


class RMSNorm(nn.Module):
  """RMSNorm over the last axis with a learned scale, computed and returned in f32."""
  axis_name: str = 'embed'
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x):
    x = x.astype(jnp.float32)
    y = x * lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.epsilon)
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones_init(), (self.axis_name,)),
                       x.shape[-1:])
    return y * scale


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding of continuous time, as in DiT.

  t: [...] in [0, 1], scaled by 1000 so the frequencies see DiT's range of integer timesteps.
  Returns [..., dim] f32: cosines then sines of geometric frequencies from 1 to 1/max_period.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = 1000.0 * t.astype(jnp.float32)[..., None] * freqs
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, [(0, 0)] * t.ndim + [(0, 1)])
  return emb


class TimestepEmbedder(nn.Module):
  """t: [...] in [0, 1] -> [..., width]: a frequency embedding followed by a SiLU MLP."""
  width: int
  frequency_dim: int = 256
  dtype: Any = jnp.float32
  matmul: str = 'default'

  @nn.compact
  def __call__(self, t):
    x = timestep_embedding(t, self.frequency_dim)
    init = nn.initializers.normal(0.02)  # DiT's initialisation of the timestep MLP.
    x = dense(self.width, (None, 'embed'), kernel_init=init, dtype=self.dtype, matmul=self.matmul, name='fc1')(x)
    x = nn.silu(x.astype(jnp.float32))
    return dense(self.width, ('mlp', 'embed'), kernel_init=init, dtype=self.dtype, matmul=self.matmul,
                 name='fc2')(x)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """adaLN modulation x * (1 + scale) + shift; all [B, L, D] (or broadcastable), in f32."""
  return x.astype(jnp.float32) * (1 + scale.astype(jnp.float32)) + shift.astype(jnp.float32)


class MLP(nn.Module):
  """Transformer MLP: Dense -> GELU (tanh approximation, in f32) -> Dense. x: [B, L, width]."""
  hidden: int
  dtype: Any = jnp.float32
  matmul: str = 'default'

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    h = dense(self.hidden, ('embed', 'mlp'), dtype=self.dtype, matmul=self.matmul, name='fc1')(x)
    h = nn.gelu(h.astype(jnp.float32), approximate=True)  # bf16 GELU is slow on CPU and imprecise.
    h = nn.with_logical_constraint(h, ('act_batch', 'act_length', 'act_mlp'))
    return dense(width, ('mlp', 'embed'), dtype=self.dtype, matmul=self.matmul, name='fc2')(h)
