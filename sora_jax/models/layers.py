"""Building blocks shared by the models: the matmul entry point, dense layers with logical axis names,
f32 norms, timestep embeddings, adaLN modulation and the transformer MLP.

Parameters are f32 and carry logical axis names (`nn.with_logical_partitioning`); a config's
logical-axis rules map those names onto mesh axes, so no module here knows about a mesh.
"""

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

MATMULS = ("default", "bf16")


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
    """Both gradients as bf16 x bf16 -> f32 products, in the operand order that yields a Dense
    layer's gradients without transposes; `dot_general` lays its output out as [batch, free axes of
    its first operand, free axes of its second], which the final transposes put back in place."""
    lhs, rhs = residuals
    g = g.astype(jnp.bfloat16)
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    lhs_free = [d for d in range(lhs.ndim) if d not in lhs_contract + lhs_batch]
    rhs_free = [d for d in range(rhs.ndim) if d not in rhs_contract + rhs_batch]
    g_batch = list(range(len(lhs_batch)))  # g: [batch, lhs free, rhs free]
    g_lhs = [len(g_batch) + i for i in range(len(lhs_free))]
    g_rhs = [len(g_batch) + len(lhs_free) + i for i in range(len(rhs_free))]

    d_lhs = _bf16_dot(g, rhs, ((g_rhs, rhs_free), (g_batch, rhs_batch)))
    lhs_axes = list(lhs_batch) + lhs_free + [lhs_contract[i] for i in np.argsort(rhs_contract)]
    d_rhs = _bf16_dot(lhs, g, ((lhs_free, g_lhs), (lhs_batch, g_batch)))
    rhs_axes = list(rhs_batch) + [rhs_contract[i] for i in np.argsort(lhs_contract)] + rhs_free
    return (jnp.transpose(d_lhs, np.argsort(lhs_axes)).astype(lhs_dtype),
            jnp.transpose(d_rhs, np.argsort(rhs_axes)).astype(rhs_dtype))


_bf16_dot_general.defvjp(_bf16_dot_general_fwd, _bf16_dot_general_bwd)


def bf16_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """`lax.dot_general` with bf16 operands and f32 results, forward and backward.

    Plain autodiff would hand the backward matmuls an f32 cotangent, and on CPU a mixed bf16 x f32
    matmul runs at f32 speed or slower; casting the cotangent to bf16 keeps all three matmuls of a
    layer on the fast bf16 x bf16 -> f32 path. Gradients return in the operands' own dtypes, so an f32
    kernel gets an f32 gradient.
    """
    del precision, preferred_element_type  # Fixed: bf16 operands, f32 results.
    # Hashable, of plain ints: a static argument of the custom_vjp.
    dimension_numbers = tuple(tuple(tuple(map(int, axes)) for axes in pair) for pair in dimension_numbers)
    return _bf16_dot_general(lhs, rhs, dimension_numbers, jnp.dtype(lhs.dtype), jnp.dtype(rhs.dtype))


def dense_dot_general(kind: str) -> Callable[..., jax.Array]:
    """The matmul behind every dense layer: 'default' (XLA's own) or 'bf16' (`bf16_dot_general`)."""
    if kind == "default":
        return lax.dot_general
    if kind == "bf16":
        return bf16_dot_general
    raise ValueError(f"unknown matmul {kind!r}; valid: {', '.join(MATMULS)}")


class Dense(nn.Module):
    """A dense layer over one or more contracted axes whose kernel and bias carry logical names.

    Unlike `nn.DenseGeneral`, the kernel is created at its full rank (the initializer sees the
    flattened fan-in/fan-out), so its logical names always match its shape, also under a mesh.
    """

    features: tuple[int, ...]
    kernel_axes: tuple[str | None, ...]
    axis: tuple[int, ...] = (-1,)
    kernel_init: Callable = nn.initializers.xavier_uniform()
    dtype: Any = None
    matmul: str = "default"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        axis = tuple(a % x.ndim for a in self.axis)
        in_shape = tuple(x.shape[a] for a in axis)
        fan = (math.prod(in_shape), math.prod(self.features))
        init = lambda key, shape, dtype: self.kernel_init(key, fan, dtype).reshape(shape)
        kernel = self.param("kernel", nn.with_logical_partitioning(init, self.kernel_axes),
                            in_shape + self.features, jnp.float32)
        bias = self.param("bias", nn.with_logical_partitioning(
            nn.initializers.zeros_init(), self.kernel_axes[len(axis):]), self.features, jnp.float32)
        if self.matmul == "default" and self.dtype is not None:
            x, kernel, bias = (a.astype(self.dtype) for a in (x, kernel, bias))
        dims = ((axis, tuple(range(len(axis)))), ((), ()))
        y = dense_dot_general(self.matmul)(x, kernel, dims)
        # dot_general puts the remaining input axes first, then the features.
        return y + bias.astype(y.dtype)


def dense(features: int | Sequence[int], kernel_axes: Sequence[str | None], *,
          axis: int | Sequence[int] = -1, kernel_init: Callable = nn.initializers.xavier_uniform(),
          dtype: Any = None, matmul: str = "default", name: str | None = None) -> Dense:
    """A `Dense` layer; kernel_axes names the contracted input axes, then the `features` axes.

    dtype: compute dtype of the 'default' matmul. The 'bf16' matmul casts its operands itself, so the
      layer hands them over as they are and an f32 kernel's gradient is accumulated and kept in f32.
    """
    features = (features,) if isinstance(features, int) else tuple(features)
    axis = (axis,) if isinstance(axis, int) else tuple(axis)
    return Dense(features, tuple(kernel_axes), axis, kernel_init, dtype, matmul, name=name)


def _scale_param(module: nn.Module, name: str, axis_name: str, size: int, init: Callable) -> jax.Array:
    return module.param(name, nn.with_logical_partitioning(init, (axis_name,)), (size,), jnp.float32)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis, computed and returned in f32 (bf16 statistics are imprecise, and
    slow on CPU). use_scale=False drops the learned scale and bias, for norms that adaLN modulates."""

    use_scale: bool = True
    axis_name: str = "embed"
    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x):
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        y = (x - mean) * lax.rsqrt(jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True) + self.epsilon)
        if self.use_scale:
            scale = _scale_param(self, "scale", self.axis_name, x.shape[-1], nn.initializers.ones_init())
            bias = _scale_param(self, "bias", self.axis_name, x.shape[-1], nn.initializers.zeros_init())
            y = y * scale + bias
        return y


class RMSNorm(nn.Module):
    """RMSNorm over the last axis with a learned scale, computed and returned in f32."""

    axis_name: str = "embed"
    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x):
        x = x.astype(jnp.float32)
        y = x * lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.epsilon)
        return y * _scale_param(self, "scale", self.axis_name, x.shape[-1], nn.initializers.ones_init())


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of continuous time, as in DiT.

    t: [...] in [0, 1], scaled by 1000 so that the frequencies span DiT's range of integer timesteps.
    Returns [..., dim] f32: cosines, then sines, of geometric frequencies from 1 down to 1/max_period.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = 1000.0 * t.astype(jnp.float32)[..., None] * freqs
    emb = jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)
    return jnp.pad(emb, [(0, 0)] * t.ndim + [(0, dim % 2)])


class TimestepEmbedder(nn.Module):
    """t: [...] in [0, 1] -> [..., width]: the frequency embedding, then a SiLU MLP."""

    width: int
    frequency_dim: int = 256
    dtype: Any = jnp.float32
    matmul: str = "default"

    @nn.compact
    def __call__(self, t):
        # DiT initialises the timestep MLP with std 0.02.
        proj = functools.partial(dense, kernel_init=nn.initializers.normal(0.02), dtype=self.dtype,
                                 matmul=self.matmul)
        x = proj(self.width, (None, "mlp"), name="fc1")(timestep_embedding(t, self.frequency_dim))
        return proj(self.width, ("mlp", "embed"), name="fc2")(nn.silu(x.astype(jnp.float32)))


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """adaLN modulation, x * (1 + scale) + shift, in f32; shift and scale broadcast against x."""
    return x.astype(jnp.float32) * (1 + scale.astype(jnp.float32)) + shift.astype(jnp.float32)


class MLP(nn.Module):
    """Transformer MLP, x: [B, L, width] -> Dense(hidden) -> GELU (tanh approximation) -> Dense(width)."""

    hidden: int
    dtype: Any = jnp.float32
    matmul: str = "default"

    @nn.compact
    def __call__(self, x):
        proj = functools.partial(dense, dtype=self.dtype, matmul=self.matmul)
        h = proj(self.hidden, ("embed", "mlp"), name="fc1")(x)
        h = nn.gelu(h.astype(jnp.float32), approximate=True)  # In f32: bf16 GELU is slow on CPU.
        h = nn.with_logical_constraint(h, ("act_batch", "act_length", "act_mlp"))
        return proj(x.shape[-1], ("mlp", "embed"), name="fc2")(h)
