"""Diffusion Transformer over spacetime patches.

DiT (Peebles & Xie, 2023) with cross-attention to text (as in PixArt-alpha), 3D RoPE, and a timestep
per temporal position, so clean conditioning frames (t = 0) and noisy frames share one sequence:

    x [B, T, H, W, C] -patchify-> [B, L, pt*ph*pw*C] -Dense-> [B, L, width]
      -> depth x DiTBlock: adaLN-Zero(t, pooled text) around self-attention (3D RoPE) and the MLP,
                           cross-attention to the text tokens between them
      -> adaLN LayerNorm, Dense -unpatchify-> [B, T, H, W, C]
"""

import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sora_jax.models.attention import attention
from sora_jax.models.layers import MLP, LayerNorm, RMSNorm, TimestepEmbedder, dense, modulate
from sora_jax.models.patch import apply_rope, grid_size, patchify, rope_3d, unpatchify

# What each block keeps for the backward pass: everything ('none'), only its input ('full': the
# block is recomputed), or also its matmul outputs ('dots').
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
}
_TOKENS = ("act_batch", "act_length", "act_embed")
_HEADS = ("act_batch", "act_length", "act_heads", None)
_zeros = nn.initializers.zeros_init()


def _per_token(c: jax.Array, length: int) -> jax.Array:
    """c: [B, Tt, D], one row per temporal position -> [B, L, D], each row repeated for the L / Tt
    tokens of its position (patchify orders tokens time-major)."""
    return jnp.repeat(c, length // c.shape[1], axis=1)


class Attention(nn.Module):
    """Multi-head attention of x [B, L, width] to itself, or to a context [B, Lc, width]."""

    num_heads: int
    qk_norm: bool
    dtype: Any
    matmul: str
    backend: str
    out_init: Any = nn.initializers.xavier_uniform()

    @nn.compact
    def __call__(self, x, context=None, mask=None, rope=None):
        width = x.shape[-1]
        heads = (self.num_heads, width // self.num_heads)
        proj = functools.partial(dense, dtype=self.dtype, matmul=self.matmul)
        if context is None:
            qkv = proj((3, *heads), ("embed", None, "heads", "head_dim"), name="qkv")(x)
            q, k, v = jnp.unstack(qkv, axis=2)
        else:
            q = proj(heads, ("embed", "heads", "head_dim"), name="q")(x)
            kv = proj((2, *heads), ("embed", None, "heads", "head_dim"), name="kv")(context)
            k, v = jnp.unstack(kv, axis=2)
        if self.qk_norm:  # Bounds the attention logits, whose growth destabilises training at scale.
            q = RMSNorm("head_dim", name="q_norm")(q)
            k = RMSNorm("head_dim", name="k_norm")(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k, v = (nn.with_logical_constraint(a.astype(self.dtype), _HEADS) for a in (q, k, v))
        out = attention(q, k, v, mask=mask, backend=self.backend)
        return proj(width, ("heads", "head_dim", "embed"), axis=(-2, -1), kernel_init=self.out_init,
                    name="out")(out)


class DiTBlock(nn.Module):
    """adaLN-Zero block: x + gate * f(modulate(norm(x))) around self-attention and the MLP, with a
    plain residual cross-attention to the text in between. The gates and the cross-attention's output
    projection start at zero, so a new block is the identity."""

    num_heads: int
    mlp_ratio: float
    qk_norm: bool
    dtype: Any
    matmul: str
    attention_backend: str

    @nn.compact
    def __call__(self, x, cond, context, context_mask, rope):
        """x: [B, L, width] f32; cond: [B, Tt, width], one conditioning vector per temporal position;
        context: [B, Lc, width] text tokens; context_mask: bool [B, Lc]; rope: (cos, sin), each
        [L, head_dim / 2]. Returns (x, None), the carry and output of one step of nn.scan."""
        width = x.shape[-1]
        attn = functools.partial(Attention, self.num_heads, self.qk_norm, self.dtype, self.matmul,
                                 self.attention_backend)
        mod = dense(6 * width, ("embed", "mlp"), kernel_init=_zeros, dtype=self.dtype, matmul=self.matmul,
                    name="adaLN_modulation")(nn.silu(cond))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(
            _per_token(mod, x.shape[1]), 6, axis=-1)

        h = modulate(LayerNorm(use_scale=False, name="norm1")(x), shift_msa, scale_msa)
        x = nn.with_logical_constraint(x + gate_msa * attn(name="attn")(h, rope=rope), _TOKENS)
        h = LayerNorm(name="norm_cross")(x)
        h = attn(out_init=_zeros, name="cross_attn")(h, context, mask=context_mask[:, None, None, :])
        x = nn.with_logical_constraint(x + h, _TOKENS)
        h = modulate(LayerNorm(use_scale=False, name="norm2")(x), shift_mlp, scale_mlp)
        x = x + gate_mlp * MLP(int(width * self.mlp_ratio), self.dtype, self.matmul, name="mlp")(h)
        return nn.with_logical_constraint(x, _TOKENS), None


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a zero-initialised projection to patch values, so the network's
    output starts at exactly zero."""

    patch_dim: int
    dtype: Any
    matmul: str

    @nn.compact
    def __call__(self, x, cond):
        proj = functools.partial(dense, kernel_init=_zeros, dtype=self.dtype, matmul=self.matmul)
        mod = proj(2 * x.shape[-1], ("embed", "mlp"), name="adaLN_modulation")(nn.silu(cond))
        shift, scale = jnp.split(_per_token(mod, x.shape[1]), 2, axis=-1)
        x = modulate(LayerNorm(use_scale=False, name="norm")(x), shift, scale)
        return proj(self.patch_dim, ("embed", "patch"), name="linear")(x)


class DiT(nn.Module):
    """Text-conditioned Diffusion Transformer on videos (images are 1-frame videos).

    Block parameters are always stacked along a leading 'layers' axis, as nn.scan makes them, so one
    checkpoint serves every setting of scan_layers and remat_policy. scan_layers=True runs the blocks
    as a loop (compiles once per block, not per layer); False unrolls it into straight-line code,
    which runs faster on CPU.
    """

    in_channels: int
    patch_size: tuple[int, int, int]
    width: int
    depth: int
    num_heads: int
    text_dim: int
    mlp_ratio: float = 4.0
    qk_norm: bool = True
    dtype: Any = jnp.float32  # Compute dtype; parameters are f32 regardless.
    matmul: str = "default"  # layers.MATMULS
    attention_backend: str = "xla"  # attention.BACKENDS
    scan_layers: bool = False
    remat_policy: str = "none"  # REMAT_POLICIES
    rope_theta: float = 10000.0

    @nn.compact
    def __call__(self, x, t, text, text_mask, drop_text=None):
        """x: [B, T, H, W, C] noisy frames, and clean ones given as conditioning.
        t: [B, T / pt] flow time in [0, 1] of each temporal position.
        text: [B, Lc, text_dim] caption tokens; text_mask: bool [B, Lc], True for real tokens.
        drop_text: optional bool [B]: rows that see a learned null caption instead of their own
          (caption dropout for classifier-free guidance; unconditional sampling). A caption without
          tokens is treated the same way, so cross-attention always has a key to attend to.
        Returns the prediction, [B, T, H, W, C] in x's dtype.
        """
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"unknown remat_policy {self.remat_policy!r}; "
                             f"valid: {', '.join(REMAT_POLICIES)}")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not a multiple of num_heads {self.num_heads}")
        batch, *shape, channels = x.shape
        grid = grid_size(shape, self.patch_size)
        if t.shape != (batch, grid[0]):
            raise ValueError(f"t has shape {t.shape}; expected (batch, frames / pt) = {(batch, grid[0])}")
        proj = functools.partial(dense, dtype=self.dtype, matmul=self.matmul)

        tokens = patchify(x, self.patch_size)
        h = proj(self.width, ("patch", "embed"), name="patch_embed")(tokens)
        h = nn.with_logical_constraint(h.astype(jnp.float32), _TOKENS)

        context = RMSNorm("text_embed", name="text_norm")(text)
        context = proj(self.width, ("text_embed", "embed"), name="text_proj")(context).astype(jnp.float32)
        drop = ~jnp.any(text_mask, axis=-1)
        if drop_text is not None:
            drop = drop | drop_text
        null_init = nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",))
        null = self.param("null_caption", null_init, (self.width,))
        context = jnp.where(drop[:, None, None], null, context)
        context_mask = jnp.where(drop[:, None], jnp.arange(text_mask.shape[1]) == 0, text_mask)

        # One conditioning vector per temporal position: its timestep plus the caption's mean.
        weights = context_mask[..., None].astype(jnp.float32)
        pooled = jnp.sum(context * weights, axis=1) / jnp.sum(weights, axis=1)
        cond = TimestepEmbedder(self.width, dtype=self.dtype, matmul=self.matmul, name="t_embedder")(t)
        cond = cond + proj(self.width, ("embed", "mlp"), name="text_pool_proj")(pooled)[:, None]

        block = DiTBlock
        if self.remat_policy != "none":
            # A loop already keeps XLA from merging the recomputation back into the forward pass.
            block = nn.remat(block, policy=REMAT_POLICIES[self.remat_policy],
                             prevent_cse=not self.scan_layers)
        blocks = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=(nn.broadcast,) * 4, length=self.depth,
                         unroll=1 if self.scan_layers else self.depth,
                         metadata_params={nn.PARTITION_NAME: "layers"})
        blocks = blocks(self.num_heads, self.mlp_ratio, self.qk_norm, self.dtype, self.matmul,
                        self.attention_backend, name="blocks")
        rope = rope_3d(grid, self.width // self.num_heads, self.rope_theta)
        h, _ = blocks(h, cond, context, context_mask, rope)

        out = FinalLayer(tokens.shape[-1], self.dtype, self.matmul, name="final_layer")(h, cond)
        return unpatchify(out, grid, self.patch_size, channels).astype(x.dtype)

    def flops_per_example(self, shape: Sequence[int], text_len: int) -> float:
        """Forward FLOPs (2 x multiply-adds) of the matmuls and attention products for one example of
        (T, H, W) frames and text_len caption tokens; a training step costs about 3x this."""
        grid = grid_size(shape, self.patch_size)
        positions, tokens = grid[0], math.prod(grid)
        patch_dim = math.prod(self.patch_size) * self.in_channels
        w, hidden = self.width, int(self.width * self.mlp_ratio)
        block = (tokens * 4 * w * w  # self-attention projections
                 + 2 * tokens * tokens * w  # q k^T and p v
                 + (tokens + 2 * text_len) * w * w + tokens * w * w  # cross-attention projections
                 + 2 * tokens * text_len * w  # cross-attention products
                 + 2 * tokens * w * hidden  # MLP
                 + positions * w * 6 * w)  # adaLN modulation, once per temporal position
        macs = (self.depth * block
                + 2 * tokens * patch_dim * w  # patch embedding and final projection
                + positions * w * 2 * w  # final modulation
                + text_len * self.text_dim * w + w * w  # text projection and pooled text
                + positions * (TimestepEmbedder.frequency_dim * w + w * w))  # timestep MLP
        return 2.0 * macs
