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

MATMULS = ("default", "bf16", "f32")


def _dot(lhs, rhs, dimension_numbers, dtype):
    return lax.dot_general(lhs.astype(dtype), rhs.astype(dtype), dimension_numbers,
                           preferred_element_type=jnp.float32)


def row_major(x: jax.Array, axes: Sequence[int] | None = None) -> jax.Array:
    """x, or x transposed by `axes`, as a materialized row-major array.

    The CPU's fast matmul library takes operands whose contracted axes come last (or first, for the
    second operand) in row-major layout. XLA otherwise folds a transpose into the dimension numbers
    or layout of the dot that reads it, and the dot then runs on a slower matmul (or fails at run
    time: "Unsupported element type for DotThunk::Execute"); the optimization barriers keep the
    transpose a copy of its own.
    """
    if axes is not None and list(axes) != list(range(x.ndim)):
        x = jnp.transpose(lax.optimization_barrier(x), axes)
    return lax.optimization_barrier(x.reshape(-1, x.shape[-1])).reshape(x.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _custom_dot_general(lhs, rhs, dimension_numbers, lhs_dtype, rhs_dtype, dtype):
    return _dot(lhs, rhs, dimension_numbers, dtype)


def _custom_dot_general_fwd(lhs, rhs, dimension_numbers, lhs_dtype, rhs_dtype, dtype):
    lhs, rhs = lhs.astype(dtype), rhs.astype(dtype)
    return _dot(lhs, rhs, dimension_numbers, dtype), (lhs, rhs)


def _custom_dot_general_bwd(dimension_numbers, lhs_dtype, rhs_dtype, dtype, residuals, g):
    """Both gradients as `dtype` x `dtype` -> f32 products in layouts the CPU's matmul library
    takes, each contracting the last axes of its row-major first operand. For a Dense layer, x [T, in]
    and kernel [in, out]: dx = g kernel^T as it is; dkernel = x^T g, with a row-major copy of x^T
    (`row_major`), or, where g is the smaller array (out < in), dkernel^T = g^T x with a copy of g^T
    and then of the (small) result. `dot_general` lays its output out as [batch, free axes of its
    first operand, free axes of its second], which the final transposes put back in place."""
    lhs, rhs = residuals
    g = g.astype(dtype)
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    lhs_free = [d for d in range(lhs.ndim) if d not in lhs_contract + lhs_batch]
    rhs_free = [d for d in range(rhs.ndim) if d not in rhs_contract + rhs_batch]
    batch = len(lhs_batch)
    g_batch = list(range(batch))  # g: [batch, lhs free, rhs free]
    g_lhs = [batch + i for i in range(len(lhs_free))]
    g_rhs = [batch + len(lhs_free) + i for i in range(len(rhs_free))]

    d_lhs = _dot(g, rhs, ((g_rhs, rhs_free), (g_batch, rhs_batch)), dtype)
    lhs_axes = list(lhs_batch) + lhs_free + [lhs_contract[i] for i in np.argsort(rhs_contract)]
    by_rhs = [lhs_contract[i] for i in np.argsort(rhs_contract)]  # lhs's, in the order of rhs's
    if g.size < lhs.size:
        # g^T as [batch, rhs free, lhs free] times lhs over its free axes.
        g_t = row_major(g, g_batch + g_rhs + g_lhs)
        contract = list(range(batch + len(rhs_free), g.ndim))
        d_rhs = row_major(_dot(g_t, lhs, ((contract, lhs_free), (g_batch, lhs_batch)), dtype))
        rhs_axes = list(rhs_batch) + rhs_free + [rhs_contract[i] for i in np.argsort(lhs_contract)]
    else:
        # lhs^T as [batch, contracted axes in rhs's order, free] times g over lhs's free axes.
        lhs_t = row_major(lhs, list(lhs_batch) + by_rhs + lhs_free)
        contract = list(range(batch + len(lhs_contract), lhs.ndim))
        d_rhs = _dot(lhs_t, g, ((contract, g_lhs), (g_batch, g_batch)), dtype)
        rhs_axes = list(rhs_batch) + sorted(rhs_contract) + rhs_free
    return (jnp.transpose(d_lhs, np.argsort(lhs_axes)).astype(lhs_dtype),
            jnp.transpose(d_rhs, np.argsort(rhs_axes)).astype(rhs_dtype))


_custom_dot_general.defvjp(_custom_dot_general_fwd, _custom_dot_general_bwd)


def _custom(lhs, rhs, dimension_numbers, dtype):
    # Hashable, of plain ints: a static argument of the custom_vjp.
    dimension_numbers = tuple(tuple(tuple(map(int, axes)) for axes in pair) for pair in dimension_numbers)
    return _custom_dot_general(lhs, rhs, dimension_numbers, jnp.dtype(lhs.dtype), jnp.dtype(rhs.dtype),
                               jnp.dtype(dtype))


def bf16_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """`lax.dot_general` with bf16 operands and f32 results, forward and backward.

    Plain autodiff would hand the backward matmuls an f32 cotangent, and on CPU a mixed bf16 x f32
    matmul runs at f32 speed or slower; casting the cotangent to bf16 keeps all three matmuls of a
    layer on the bf16 x bf16 -> f32 path, in layouts the fast matmul library takes. Gradients return
    in the operands' own dtypes, so an f32 kernel gets an f32 gradient.
    """
    del precision, preferred_element_type  # Fixed: bf16 operands, f32 results.
    return _custom(lhs, rhs, dimension_numbers, jnp.bfloat16)


def f32_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """`lax.dot_general` in f32 with the backward of `bf16_dot_general`: for CPUs whose fast matmul
    is the f32 one. XLA's own backward reads transposed operands, which on CPU run on a slower
    matmul or get fused with their producers (see `row_major`)."""
    del precision, preferred_element_type  # Fixed: f32 operands and results.
    return _custom(lhs, rhs, dimension_numbers, jnp.float32)


def dense_dot_general(kind: str) -> Callable[..., jax.Array]:
    """The matmul behind every dense layer: 'default' (XLA's own), 'bf16' (`bf16_dot_general`) or
    'f32' (`f32_dot_general`)."""
    if kind == "default":
        return lax.dot_general
    if kind == "bf16":
        return bf16_dot_general
    if kind == "f32":
        return f32_dot_general
    raise ValueError(f"unknown matmul {kind!r}; valid: {', '.join(MATMULS)}")


@jax.custom_vjp
def gradient_barrier(x: jax.Array) -> jax.Array:
    """The identity, whose gradient XLA computes once, as one array: for XLA's CPU compiler.

    In a residual network the gradient of a block's input is a chain of sums over all later blocks.
    XLA's CPU compiler fuses cheap elementwise chains into each of their consumers, so every consumer
    (a norm's or a gate's backward) recomputes the chain from the top: the backward pass costs
    depth^2 passes over the activations (12 blocks of DiT-S: 1.5 s of a 10 s step). An
    optimization barrier does not stop it (the CPU compiler drops barriers before fusing); a
    conditional does. Its predicate reads the gradient, so it must be evaluated: a device-to-host
    sync on GPUs, which is why the model applies this only with the CPU matmuls.
    """
    return x


def _materialized(g):
    # Both branches pass g on; one multiplies by 1 so that XLA keeps the conditional.
    return lax.cond(jnp.isnan(g.ravel()[0]), lambda g: g * 1.0, lambda g: g, g)


gradient_barrier.defvjp(lambda x: (x, None), lambda _, g: (_materialized(g),))


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

    dtype: compute dtype of the 'default' matmul. The 'bf16' and 'f32' matmuls cast their operands
      themselves, so the layer hands them over as they are and an f32 kernel's gradient is
      accumulated and kept in f32.
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
