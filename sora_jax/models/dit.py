"""Diffusion Transformer over spacetime patches.

DiT (Peebles & Xie, 2023) with cross-attention to text (as in PixArt-alpha), 3D RoPE, and a timestep
per temporal position, so clean conditioning frames (t = 0) and noisy frames share one sequence:

    x [B, T, H, W, C] -patchify-> [B, L, pt*ph*pw*C] -Dense-> [B, L, width]
      -> depth x DiTBlock: adaLN-Zero(t, pooled text) around self-attention (3D RoPE) and the MLP,
                           cross-attention to the text tokens between them
      -> adaLN LayerNorm, Dense -unpatchify-> [B, T, H, W, C]

Packed rows (NaViT; `DiT.packed`, layout in data/packing.py) hold several clips of different sizes:
segment ids make self-attention block-diagonal and send each clip's cross-attention to its own
caption, RoPE takes each token's position within its clip, and the conditioning is computed once per
slot (one temporal position of one clip) and gathered for its tokens. A grid input is the special case
of one clip filling each row, and runs the same code.
"""

import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sora_jax.models.attention import attention
from sora_jax.models.layers import (MLP, LayerNorm, RMSNorm, TimestepEmbedder, dense, gradient_barrier,
                                    modulate, timestep_embedding)
from sora_jax.models.patch import apply_rope, grid_positions, grid_size, patchify, rope, unpatchify

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


def _per_token(c: jax.Array, slot: jax.Array | None, length: int) -> jax.Array:
    """c: [B, K, D], one row per conditioning slot -> [B, L, D], the row of each token's slot.

    slot: int [B, L], or None for one clip per row, whose L / K tokens per temporal position come in
    order (patchify orders tokens time-major): a repeat then spares the gather and its scatter-add
    backward.
    """
    if slot is None:
        return jnp.repeat(c, length // c.shape[1], axis=1)
    return jnp.take_along_axis(c, slot[..., None], axis=1)


class Attention(nn.Module):
    """Multi-head attention of x [B, L, width] to itself, or to a context [B, Lc, width]."""

    num_heads: int
    qk_norm: bool
    dtype: Any
    matmul: str
    backend: str
    out_init: Any = nn.initializers.xavier_uniform()
    context_parallel: str = "none"  # parallel/context.METHODS

    @nn.compact
    def __call__(self, x, context=None, mask=None, rope=None, q_segment_ids=None, kv_segment_ids=None):
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
        # Under context parallelism the tokens are split over the mesh; a text context stays whole.
        out = attention(q, k, v, mask=mask, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                        backend=self.backend, context_parallel=self.context_parallel,
                        kv_replicated=context is not None, spec=nn.logical_to_mesh_axes(_HEADS))
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
    context_parallel: str = "none"

    @nn.compact
    def __call__(self, x, cond, context, context_ids, rope, slot=None, segment_ids=None):
        """x: [B, L, width] f32; cond: [B, K, width], one conditioning vector per slot;
        context: [B, Lc, width] text tokens; context_ids: int [B, Lc], the segment id of each text
        token (0 = padding), or with one clip per row a bool mask (True = the clip's);
        rope: (cos, sin), each [L, head_dim / 2] or [B, L, head_dim / 2].
        slot: int [B, L], the cond row of each token; segment_ids: int [B, L], the clip of each token
        (0 = padding). Both None for one clip filling each row (tokens time-major, L / K per slot),
        which then needs no attention mask but the caption's padding.
        Returns (x, None), the carry and output of one step of nn.scan."""
        width = x.shape[-1]
        attn = functools.partial(Attention, self.num_heads, self.qk_norm, self.dtype, self.matmul,
                                 self.attention_backend, context_parallel=self.context_parallel)
        if self.matmul != "default":  # the CPU matmuls: see gradient_barrier
            x = gradient_barrier(x)
        mod = dense(6 * width, ("embed", "mlp"), kernel_init=_zeros, dtype=self.dtype, matmul=self.matmul,
                    name="adaLN_modulation")(nn.silu(cond))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(
            _per_token(mod, slot, x.shape[1]), 6, axis=-1)

        h = modulate(LayerNorm(use_scale=False, name="norm1")(x), shift_msa, scale_msa)
        h = attn(name="attn")(h, rope=rope, q_segment_ids=segment_ids)
        x = nn.with_logical_constraint(x + gate_msa * h, _TOKENS)
        h = LayerNorm(name="norm_cross")(x)
        if segment_ids is None:
            h = attn(out_init=_zeros, name="cross_attn")(h, context, mask=(context_ids > 0)[:, None, None, :])
        else:
            h = attn(out_init=_zeros, name="cross_attn")(h, context, q_segment_ids=segment_ids,
                                                         kv_segment_ids=context_ids.astype(jnp.int32))
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
    def __call__(self, x, cond, slot=None):
        """x: [B, L, width]; cond: [B, K, width] per slot; slot: as `DiTBlock`'s."""
        proj = functools.partial(dense, kernel_init=_zeros, dtype=self.dtype, matmul=self.matmul)
        mod = proj(2 * x.shape[-1], ("embed", "mlp"), name="adaLN_modulation")(nn.silu(cond))
        shift, scale = jnp.split(_per_token(mod, slot, x.shape[1]), 2, axis=-1)
        x = modulate(LayerNorm(use_scale=False, name="norm")(x), shift, scale)
        return proj(self.patch_dim, ("embed", "patch"), name="linear")(x)


class SizeEmbedder(nn.Module):
    """Size conditioning as in PixArt-alpha and SDXL: sizes [..., 5] (frames, fps, height, width,
    aspect = height / width) -> [..., width], a sinusoidal embedding of each number, concatenated, then
    a SiLU MLP. Its output projection starts at zero, so turning size conditioning on leaves a model's
    function unchanged until it trains."""

    width: int
    frequency_dim: int = 256
    dtype: Any = jnp.float32
    matmul: str = "default"

    @nn.compact
    def __call__(self, sizes):
        # timestep_embedding scales its input by 1000 (for times in [0, 1]); sizes go in unscaled.
        emb = timestep_embedding(jnp.asarray(sizes, jnp.float32) / 1000.0, self.frequency_dim)
        emb = emb.reshape(*emb.shape[:-2], -1)
        proj = functools.partial(dense, dtype=self.dtype, matmul=self.matmul)
        x = proj(self.width, (None, "mlp"), kernel_init=nn.initializers.normal(0.02), name="fc1")(emb)
        x = nn.silu(x.astype(jnp.float32))
        return proj(self.width, ("mlp", "embed"), kernel_init=_zeros, name="fc2")(x)


class DiT(nn.Module):
    """Text-conditioned Diffusion Transformer on videos (images are 1-frame videos).

    `__call__` takes a batch of equal-sized clips, `packed` rows of packed clips; both run `_forward`
    with the same parameters. Block parameters are always stacked along a leading 'layers' axis, as
    nn.scan makes them, so one checkpoint serves every setting of scan_layers and remat_policy.
    scan_layers=True runs the blocks as a loop (compiles once per block, not per layer); False unrolls
    it into straight-line code, which runs faster on CPU.
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
    # How attention runs when the mesh splits the tokens over its `sequence` axis: 'none' (the
    # compiler's choice), 'ulysses' or 'ring' (parallel/context.py).
    context_parallel: str = "none"
    scan_layers: bool = False
    remat_policy: str = "none"  # REMAT_POLICIES
    rope_theta: float = 10000.0
    # Factors on the (t, h, w) positions before RoPE: 1 extrapolates to sizes beyond training;
    # below 1 interpolates a larger grid into the trained range (position interpolation).
    rope_scale: tuple[float, float, float] = (1.0, 1.0, 1.0)
    size_conditioning: bool = False  # Adds a SizeEmbedder of each clip's sizes to its conditioning.

    def __call__(self, x, t, text, text_mask, drop_text=None, sizes=None):
        """x: [B, T, H, W, C] noisy frames, and clean ones given as conditioning.
        t: [B, T / pt] flow time in [0, 1] of each temporal position.
        text: [B, Lc, text_dim] caption tokens; text_mask: bool [B, Lc], True for real tokens.
        drop_text: optional bool [B]: rows that see a learned null caption instead of their own
          (caption dropout for classifier-free guidance; unconditional sampling). A caption without
          tokens is treated the same way, so cross-attention always has a key to attend to.
        sizes: float [B, 5], (frames, fps, height, width, aspect) of each clip in pixels
          (`data.packing.size_features`); needed with size_conditioning, ignored without.
        Returns the prediction, [B, T, H, W, C] in x's dtype.
        """
        batch, *shape, channels = x.shape
        grid = grid_size(shape, self.patch_size)
        if t.shape != (batch, grid[0]):
            raise ValueError(f"t has shape {t.shape}; expected (batch, frames / pt) = {(batch, grid[0])}")
        # One clip per row: its own caption and sizes, one slot per temporal position.
        out = self._forward(patchify(x, self.patch_size), t, text[:, None], text_mask[:, None],
                            None if drop_text is None else drop_text[:, None],
                            None if sizes is None else sizes[:, None],
                            positions=grid_positions(grid), slot=None,
                            slot_clip=jnp.ones((batch, grid[0]), jnp.int32), segment_ids=None)
        return unpatchify(out, grid, self.patch_size, channels).astype(x.dtype)

    def packed(self, tokens, t, text, text_mask, *, segment_ids, positions, slot, slot_clip,
               drop_text=None, sizes=None):
        """Rows of packed clips, in the layout of data/packing.py (L tokens, M clip slots and K
        conditioning slots per row).

        tokens: [B, L, pt*ph*pw*C] patch values of noisy frames, and clean ones given as conditioning.
        t: [B, K] flow time in [0, 1] of each conditioning slot (one temporal position of one clip).
        text: [B, M, Lc, text_dim] and text_mask: bool [B, M, Lc], the caption of each clip slot.
        segment_ids: int [B, L], m + 1 for the tokens of clip slot m, 0 for padding.
        positions: int [B, L, 3], each token's (t, h, w) in its clip's patch grid.
        slot: int [B, L], each token's conditioning slot; slot_clip: int [B, K], m + 1 for the clip
          slot each conditioning slot belongs to, 0 if unused.
        drop_text: optional bool [B, M], clips that see the null caption (see `__call__`).
        sizes: float [B, M, 5], as `__call__`'s, per clip slot.
        Returns the prediction, [B, L, pt*ph*pw*C] in tokens' dtype; padding tokens get finite values
        that mean nothing.
        """
        batch, length, _ = tokens.shape
        clips, slots = text_mask.shape[1], slot_clip.shape[1]
        expected = {"t": (t, (batch, slots)), "text": (text, (*text_mask.shape, self.text_dim)),
                    "segment_ids": (segment_ids, (batch, length)), "slot": (slot, (batch, length)),
                    "positions": (positions, (batch, length, 3)), "slot_clip": (slot_clip, (batch, slots))}
        if drop_text is not None:
            expected["drop_text"] = (drop_text, (batch, clips))
        if sizes is not None:
            expected["sizes"] = (sizes, (batch, clips, 5))
        for name, (array, shape) in expected.items():
            if tuple(array.shape) != shape:
                raise ValueError(f"packed DiT input {name} has shape {tuple(array.shape)}; expected {shape} "
                                 f"for {batch} rows of {length} tokens, {clips} clips and {slots} slots")
        out = self._forward(tokens, t, text, text_mask, drop_text, sizes, positions=positions, slot=slot,
                            slot_clip=slot_clip, segment_ids=segment_ids)
        return out.astype(tokens.dtype)

    @nn.compact
    def _forward(self, tokens, t, text, text_mask, drop_text, sizes, *, positions, slot, slot_clip,
                 segment_ids):
        """Both paths, with `packed`'s arguments; positions may also be [L, 3], shared by the rows, and
        slot and segment_ids None for one clip filling each row (tokens time-major, as patchify makes
        them). Returns [B, L, pt*ph*pw*C] f32."""
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"unknown remat_policy {self.remat_policy!r}; "
                             f"valid: {', '.join(REMAT_POLICIES)}")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not a multiple of num_heads {self.num_heads}")
        if self.size_conditioning and sizes is None:
            raise ValueError("a DiT with size_conditioning needs sizes (frames, fps, height, width, "
                             "aspect) per clip; see data.packing.size_features")
        proj = functools.partial(dense, dtype=self.dtype, matmul=self.matmul)
        h = proj(self.width, ("patch", "embed"), name="patch_embed")(tokens)
        h = nn.with_logical_constraint(h.astype(jnp.float32), _TOKENS)

        batch, clips, text_len = text_mask.shape
        context = RMSNorm("text_embed", name="text_norm")(text)
        context = proj(self.width, ("text_embed", "embed"), name="text_proj")(context).astype(jnp.float32)
        drop = ~jnp.any(text_mask, axis=-1)
        if drop_text is not None:
            drop = drop | drop_text
        null_init = nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",))
        null = self.param("null_caption", null_init, (self.width,))
        context = jnp.where(drop[..., None, None], null, context)
        context_mask = jnp.where(drop[..., None], jnp.arange(text_len) == 0, text_mask)

        # One conditioning vector per slot: its timestep plus its clip's mean caption token (and size),
        # computed per clip and gathered per slot. Unused slots (slot_clip 0) have no tokens.
        weights = context_mask[..., None].astype(jnp.float32)
        pooled = jnp.sum(context * weights, axis=2) / jnp.sum(weights, axis=2)
        clip_cond = proj(self.width, ("embed", "mlp"), name="text_pool_proj")(pooled)
        if self.size_conditioning:
            clip_cond = clip_cond + SizeEmbedder(self.width, dtype=self.dtype, matmul=self.matmul,
                                                 name="size_embedder")(sizes)
        cond = TimestepEmbedder(self.width, dtype=self.dtype, matmul=self.matmul, name="t_embedder")(t)
        cond = cond + jnp.take_along_axis(clip_cond, jnp.maximum(slot_clip - 1, 0)[..., None], axis=1)

        # The text tokens of all clips in one sequence, each carrying its clip's segment id, so that
        # cross-attention sends every clip to its own caption.
        context = context.reshape(batch, clips * text_len, self.width)
        clip_ids = jnp.arange(1, clips + 1, dtype=jnp.int32)[:, None]
        context_ids = jnp.where(context_mask, clip_ids, 0).reshape(batch, clips * text_len)

        block = DiTBlock
        if self.remat_policy != "none":
            # A loop already keeps XLA from merging the recomputation back into the forward pass.
            block = nn.remat(block, policy=REMAT_POLICIES[self.remat_policy],
                             prevent_cse=not self.scan_layers)
        blocks = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=(nn.broadcast,) * 6, length=self.depth,
                         unroll=1 if self.scan_layers else self.depth,
                         metadata_params={nn.PARTITION_NAME: "layers"})
        blocks = blocks(self.num_heads, self.mlp_ratio, self.qk_norm, self.dtype, self.matmul,
                        self.attention_backend, self.context_parallel, name="blocks")
        scaled = jnp.asarray(positions, jnp.float32) * jnp.asarray(self.rope_scale, jnp.float32)
        angles = rope(scaled, self.width // self.num_heads, self.rope_theta)
        h, _ = blocks(h, cond, context, context_ids, angles, slot, segment_ids)
        return FinalLayer(tokens.shape[-1], self.dtype, self.matmul, name="final_layer")(h, cond, slot)

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
        if self.size_conditioning:
            macs += 5 * SizeEmbedder.frequency_dim * w + w * w
        return 2.0 * macs
