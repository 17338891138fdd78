"""The class-conditional image DiT of the DiT paper (Peebles & Xie, "Scalable Diffusion Models with
Transformers", 2023), reproduced exactly, and its port from diffusers' `DiTTransformer2DModel`.

    latent x [B, H, W, C] -patchify (p x p)-> [B, L, p*p*C] -Dense (the paper's strided conv)-> [B, L, width]
      + fixed 2D sin-cos positions
      c = StepEmbedder(t) + LabelEmbedder(y)          (one conditioning vector per image)
      -> depth x ClassDiTBlock: adaLN-Zero(c) around self-attention and the GELU-tanh MLP
      -> adaLN LayerNorm, zero-initialised Dense -unpatchify-> [B, H, W, 2C] (eps or v, then the
         variance interpolation of ADM's learned sigma)

Sizes (`MODEL_SIZES`, Table 1): S (width 384, depth 12, 6 heads), B (768, 12, 12), L (1024, 24, 16),
XL (1152, 28, 16); patches 2, 4 or 8, named like 'XL/2'. ImageNet 256x256 images become 32x32x4
latents of Stable Diffusion's VAE; 1000 classes plus a null class for classifier-free guidance.

The blocks are stacked by nn.scan with the partition name 'layers', like models/dit.py's, so the same
sharding rules, remat policies and scan options apply; the attention, MLP, final layer, norms and
dense layers are the project's own (models/dit.py, models/layers.py).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from sora_jax.models.dit import REMAT_POLICIES, Attention, FinalLayer
from sora_jax.models.layers import MLP, LayerNorm, dense, modulate
from sora_jax.models.patch import grid_size, patchify, unpatchify

# Table 1 of the paper: (width, depth, heads) per model size.
MODEL_SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
PATCH_SIZES = (2, 4, 8)
FREQUENCY_DIM = 256
_TOKENS = ("act_batch", "act_length", "act_embed")
_zeros = nn.initializers.zeros_init()


def model_size(name: str) -> dict[str, int]:
    """'XL/2' -> dict(width=1152, depth=28, num_heads=16, patch_size=2); ValueError for other names."""
    size, _, patch = name.partition("/")
    if size not in MODEL_SIZES or not patch.isdigit() or int(patch) not in PATCH_SIZES:
        valid = [f"{s}/{p}" for s in MODEL_SIZES for p in PATCH_SIZES]
        raise ValueError(f"unknown DiT model {name!r}; valid: {', '.join(valid)}")
    width, depth, num_heads = MODEL_SIZES[size]
    return dict(width=width, depth=depth, num_heads=num_heads, patch_size=int(patch))


def sincos_positions(width: int, grid_h: int, grid_w: int) -> np.ndarray:
    """DiT's fixed 2D sin-cos position embedding (from MAE): [grid_h * grid_w, width] f32, tokens in
    row-major order. The first half of the channels encodes a token's column, the second its row;
    each half is [sin, cos] of geometric frequencies 1 ... 1/10000."""
    if width % 4:
        raise ValueError(f"2D sin-cos positions need a width divisible by 4, got {width}")
    omega = 1.0 / 10000.0 ** (np.arange(width // 4, dtype=np.float64) / (width / 4))
    rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64),
                             indexing="ij")
    angles = [np.outer(pos.reshape(-1), omega) for pos in (cols, rows)]
    return np.concatenate([f(a) for a in angles for f in (np.sin, np.cos)], axis=1).astype(np.float32)


@functools.cache
def _step_frequencies(half: int, max_period: float, frequency_shift: int) -> np.ndarray:
    """exp(-log(max_period) * i / (half - frequency_shift)), i < half, as f32 constants. The exponent
    is rounded to f32 as DiT's PyTorch code computes it: the embedding of t = 999 then matches the
    reference to f32 precision (another rounding of the frequencies moves its angles by ~1e-4)."""
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)
    exponent = exponent / np.float32(half - frequency_shift)
    return np.exp(exponent.astype(np.float64)).astype(np.float32)


def step_embedding(t: jax.Array, dim: int = FREQUENCY_DIM, max_period: float = 10000.0,
                   frequency_shift: int = 0) -> jax.Array:
    """Sinusoidal embedding of diffusion steps t [B] (integers 0 ... T - 1, or fractions): [B, dim] f32,
    cosines then sines of the frequencies exp(-log(max_period) * i / (dim / 2 - frequency_shift)).

    DiT (from GLIDE) uses frequency_shift 0; diffusers' port of DiT computes its frequencies with
    frequency_shift 1 (`Timesteps(downscale_freq_shift=1)`).
    """
    angles = jnp.asarray(t, jnp.float32)[:, None] * _step_frequencies(dim // 2, max_period, frequency_shift)
    emb = jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class StepEmbedder(nn.Module):
    """Diffusion steps t [B] -> [B, width]: `step_embedding`, then a SiLU MLP initialised with std 0.02."""

    width: int
    frequency_shift: int = 0
    dtype: Any = jnp.float32
    matmul: str = "default"

    @nn.compact
    def __call__(self, t):
        proj = functools.partial(dense, kernel_init=nn.initializers.normal(0.02), dtype=self.dtype,
                                 matmul=self.matmul)
        emb = step_embedding(t, FREQUENCY_DIM, frequency_shift=self.frequency_shift)
        x = proj(self.width, (None, "mlp"), name="fc1")(emb)
        return proj(self.width, ("mlp", "embed"), name="fc2")(nn.silu(x.astype(jnp.float32)))


class LabelEmbedder(nn.Module):
    """Class labels [B] -> [B, width] from a table with an extra row, the null class, for
    classifier-free guidance: rows whose `drop` is True get the null class's embedding."""

    num_classes: int
    width: int
    null_class: bool = True

    @nn.compact
    def __call__(self, labels, drop=None):
        rows = self.num_classes + int(self.null_class)
        table = self.param("embedding_table", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("vocab", "embed")), (rows, self.width), jnp.float32)
        if drop is not None:
            if not self.null_class:
                raise ValueError("dropping labels needs the null class; build the model with "
                                 "null_class=True (the paper's class_dropout_prob > 0)")
            labels = jnp.where(drop, self.num_classes, labels)
        return jnp.take(table, labels, axis=0)


class ClassDiTBlock(nn.Module):
    """adaLN-Zero block: x + gate * f(modulate(norm(x), shift, scale)) around self-attention and the
    MLP, the six modulation vectors regressed from c by a zero-initialised layer, so a new block is
    the identity."""

    num_heads: int
    mlp_ratio: float
    mlp_norm_eps: float
    dtype: Any
    matmul: str
    attention_backend: str

    @nn.compact
    def __call__(self, x, c):
        """x: [B, L, width] f32; c: [B, width]. Returns (x, None), the carry and output of nn.scan."""
        width = x.shape[-1]
        mod = dense(6 * width, ("embed", "mlp"), kernel_init=_zeros, dtype=self.dtype, matmul=self.matmul,
                    name="adaLN_modulation")(nn.silu(c))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod[:, None], 6, axis=-1)
        h = modulate(LayerNorm(use_scale=False, name="norm1")(x), shift_msa, scale_msa)
        h = Attention(num_heads=self.num_heads, qk_norm=False, dtype=self.dtype, matmul=self.matmul,
                      backend=self.attention_backend, name="attn")(h)
        x = nn.with_logical_constraint(x + gate_msa * h, _TOKENS)
        h = modulate(LayerNorm(use_scale=False, epsilon=self.mlp_norm_eps, name="norm2")(x),
                     shift_mlp, scale_mlp)
        x = x + gate_mlp * MLP(int(width * self.mlp_ratio), self.dtype, self.matmul, name="mlp")(h)
        return nn.with_logical_constraint(x, _TOKENS), None


class ClassDiT(nn.Module):
    """The DiT paper's class-conditional latent diffusion transformer.

    Attributes beyond the paper's (patch_size, in_channels, width, depth, num_heads, mlp_ratio,
    num_classes, learn_sigma):
      null_class: an extra label embedding for classifier-free guidance (the paper's
        class_dropout_prob > 0); `drop_labels` selects it.
      frequency_shift, mlp_norm_eps: 0 and 1e-6 in the paper; diffusers' port of the weights computes
        with 1 and its config's norm_eps (1e-5 by default), which `from_diffusers` sets.
      dtype, matmul, attention_backend, scan_layers, remat_policy: as models/dit.py's `DiT`.
    """

    patch_size: int
    in_channels: int
    width: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    null_class: bool = True
    learn_sigma: bool = True
    frequency_shift: int = 0
    mlp_norm_eps: float = 1e-6
    dtype: Any = jnp.float32
    matmul: str = "default"
    attention_backend: str = "xla"
    scan_layers: bool = False
    remat_policy: str = "none"

    @property
    def out_channels(self) -> int:
        """The prediction's channels (eps or v), then as many variance interpolations with learn_sigma."""
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @nn.compact
    def __call__(self, x, t, y, drop_labels=None):
        """x: [B, H, W, C] noisy latents; t: [B] diffusion steps (integers 0 ... T - 1 for a T-step
        DDPM, as the paper's model sees them); y: int [B] class labels in [0, num_classes);
        drop_labels: optional bool [B], rows that see the null class instead of their label
        (label dropout for classifier-free guidance, and the unconditional branch when sampling).
        Returns [B, H, W, out_channels] in x's dtype."""
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"unknown remat_policy {self.remat_policy!r}; "
                             f"valid: {', '.join(REMAT_POLICIES)}")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not a multiple of num_heads {self.num_heads}")
        batch, height, width, channels = x.shape
        if channels != self.in_channels:
            raise ValueError(f"x has {channels} channels; the model was built for in_channels="
                             f"{self.in_channels}")
        if t.shape != (batch,) or y.shape != (batch,):
            raise ValueError(f"t and y must be [batch] = [{batch}], got t {list(t.shape)} and "
                             f"y {list(y.shape)}")
        patch = (1, self.patch_size, self.patch_size)
        grid = grid_size((1, height, width), patch)

        h = dense(self.width, ("patch", "embed"), dtype=self.dtype, matmul=self.matmul,
                  name="x_embedder")(patchify(x[:, None], patch))
        h = h.astype(jnp.float32) + sincos_positions(self.width, grid[1], grid[2])
        h = nn.with_logical_constraint(h, _TOKENS)
        c = StepEmbedder(self.width, self.frequency_shift, self.dtype, self.matmul, name="t_embedder")(t)
        labels = LabelEmbedder(self.num_classes, self.width, self.null_class, name="y_embedder")
        c = c + labels(y, drop_labels)

        block = ClassDiTBlock
        if self.remat_policy != "none":
            block = nn.remat(block, policy=REMAT_POLICIES[self.remat_policy],
                             prevent_cse=not self.scan_layers)
        blocks = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=(nn.broadcast,), length=self.depth,
                         unroll=1 if self.scan_layers else self.depth,
                         metadata_params={nn.PARTITION_NAME: "layers"})
        h, _ = blocks(self.num_heads, self.mlp_ratio, self.mlp_norm_eps, self.dtype, self.matmul,
                      self.attention_backend, name="blocks")(h, c)
        patch_dim = self.patch_size ** 2 * self.out_channels
        out = FinalLayer(patch_dim=patch_dim, dtype=self.dtype, matmul=self.matmul,
                         name="final_layer")(h, c[:, None])
        return unpatchify(out, grid, patch, self.out_channels)[:, 0].astype(x.dtype)

    # Cost --------------------------------------------------------------------------------------

    def param_count(self, input_size: int = 32) -> int:
        """Number of parameters (the fixed positions are not parameters), from `jax.eval_shape` of
        init: nothing is allocated."""
        x = jax.ShapeDtypeStruct((1, input_size, input_size, self.in_channels), jnp.float32)
        labels = jax.ShapeDtypeStruct((1,), jnp.int32)
        params = jax.eval_shape(self.init, jax.random.key(0), x, labels, labels)["params"]
        return sum(math.prod(p.shape) for p in jax.tree.leaves(nn.meta.unbox(params)))

    def _multiply_adds(self, input_size: int) -> tuple[int, int]:
        """(multiply-adds of every matmul, elements normalised by LayerNorms) of one forward pass on an
        input_size x input_size latent."""
        tokens = (input_size // self.patch_size) ** 2
        w, hidden, patch_in = self.width, int(self.width * self.mlp_ratio), self.patch_size ** 2
        block = (tokens * 4 * w * w  # qkv and output projections
                 + 2 * tokens * tokens * w  # q k^T and p v
                 + 2 * tokens * w * hidden  # MLP
                 + 6 * w * w)  # adaLN modulation, once per image
        macs = (self.depth * block
                + tokens * patch_in * self.in_channels * w  # patch embedding
                + FREQUENCY_DIM * w + w * w  # timestep MLP
                + 2 * w * w + tokens * w * patch_in * self.out_channels)  # final modulation, projection
        return macs, (2 * self.depth + 1) * tokens * w

    def paper_gflops(self, input_size: int = 32) -> float:
        """Forward Gflops per image as the DiT paper counts them (Tables 1 and 4).

        The paper counts a multiply-add as one flop (the representation-learning convention its
        authors use, and fvcore's): here the multiply-adds of every matmul (patch embedding,
        timestep MLP, adaLN, attention projections, q k^T and p v, MLP, final layer), plus one per
        element normalised by each LayerNorm, the count that fits the printed figures. It
        reproduces Table 4 to its printed precision except DiT-B/4 (5.5664 here, printed 5.56) and
        DiT-L/8 (5.0122 here, printed 5.65, which no consistent count gives: it would break the
        ~3.9x ratio between /8 and /4 that every other size shows). fvcore itself counts 4 flops
        per LayerNorm element and gives 118.69 for XL/2 (printed 118.64); matmuls alone give 118.62.
        """
        macs, normalised = self._multiply_adds(input_size)
        return (macs + normalised) / 1e9

    def flops_per_example(self, input_size: int = 32) -> float:
        """Forward FLOPs (2 x multiply-adds of the matmuls, the project's convention for MFU, as
        models/dit.py's `DiT.flops_per_example`); a training step costs about 3x this."""
        return 2.0 * self._multiply_adds(input_size)[0]


def from_config(model: Mapping[str, Any], **overrides) -> ClassDiT:
    """A ClassDiT from a config's model section: `name` ('XL/2', see `model_size`) gives the size,
    the other keys (in_channels, num_classes, learn_sigma, dtype, matmul, ...) the rest."""
    kwargs = {**model_size(model["name"]), **{k: v for k, v in model.items() if k != "name"}, **overrides}
    return ClassDiT(**kwargs)


# Diffusers ---------------------------------------------------------------------------------------

_DIFFUSERS_BLOCK = {  # ours (under blocks/) -> diffusers (under transformer_blocks.{i}.)
    ("adaLN_modulation",): "norm1.linear",
    ("mlp", "fc1"): "ff.net.0.proj",
    ("mlp", "fc2"): "ff.net.2",
}
_DIFFUSERS_TOP = {
    ("x_embedder",): "pos_embed.proj",
    ("t_embedder", "fc1"): "norm1.emb.timestep_embedder.linear_1",
    ("t_embedder", "fc2"): "norm1.emb.timestep_embedder.linear_2",
    ("final_layer", "adaLN_modulation"): "proj_out_1",
    ("final_layer", "linear"): "proj_out_2",
}
_EMBEDDER_PREFIX = "norm1.emb."


def _check_diffusers_config(config: Mapping[str, Any]) -> None:
    expected = dict(norm_type="ada_norm_zero", activation_fn="gelu-approximate", attention_bias=True,
                    norm_elementwise_affine=False)
    wrong = {k: config.get(k, v) for k, v in expected.items() if config.get(k, v) != v}
    if config.get("num_embeds_ada_norm") is None:
        wrong["num_embeds_ada_norm"] = None
    if wrong:
        raise ValueError(f"this DiTTransformer2DModel config has {wrong}; the DiT paper's model needs "
                         f"{expected} and num_embeds_ada_norm (the number of classes)")


def from_diffusers(state_dict: Mapping[str, Any], config: Mapping[str, Any],
                   **overrides) -> tuple[ClassDiT, dict]:
    """(model, params) equal to a diffusers `DiTTransformer2DModel` with this `state_dict()` and
    `config` (its `.config`): e.g. `from_diffusers(pipe.transformer.state_dict(), pipe.transformer.config)`.

    Tensors may be torch tensors (f32 or bf16) or numpy arrays; parameters come out f32. diffusers
    keeps a copy of DiT's one timestep-and-label embedder in every block; the copies must be equal
    (as when converted from DiT's checkpoints), else ValueError. overrides: other ClassDiT fields
    (dtype, matmul, attention_backend, scan_layers, remat_policy).
    """
    _check_diffusers_config(config)
    tensors = {name: _to_numpy(value) for name, value in state_dict.items()}
    heads, in_channels = config["num_attention_heads"], config["in_channels"]
    width, depth, num_classes = heads * config["attention_head_dim"], config["num_layers"], \
        config["num_embeds_ada_norm"]
    head_dim = width // heads
    out_channels = config.get("out_channels") or in_channels
    if out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(f"out_channels={out_channels} is neither in_channels={in_channels} nor twice it "
                         "(the learned sigma)")
    used = set()

    def take(name):
        if name not in tensors:
            raise ValueError(f"the state dict has no tensor {name!r}: it is not a DiTTransformer2DModel "
                             f"with {depth} layers (config num_layers)")
        used.add(name)
        return tensors[name]

    def linear(prefix):
        return {"kernel": take(prefix + ".weight").T, "bias": take(prefix + ".bias")}

    def stacked(fn):  # one array per block -> [depth, ...], as nn.scan stacks them
        return np.stack([fn(f"transformer_blocks.{i}.") for i in range(depth)])

    _check_shared_embedders(tensors, depth)
    used.update(name for name in tensors if _EMBEDDER_PREFIX in name)  # equal to block 0's, checked
    params = {path: linear(f"transformer_blocks.0.{name}" if path[0] == "t_embedder" else name)
              for path, name in _DIFFUSERS_TOP.items()}
    conv = take("pos_embed.proj.weight")  # [width, C, p, p] -> [(p, p, C), width], patchify's order
    params[("x_embedder",)]["kernel"] = conv.transpose(2, 3, 1, 0).reshape(-1, width)
    table = take(f"transformer_blocks.0.{_EMBEDDER_PREFIX}class_embedder.embedding_table.weight")
    params[("y_embedder",)] = {"embedding_table": table}
    for path, name in _DIFFUSERS_BLOCK.items():
        params[("blocks", *path)] = {leaf: stacked(lambda p: linear(p + name)[leaf])
                                     for leaf in ("kernel", "bias")}
    params[("blocks", "attn", "qkv")] = {  # to_q, to_k, to_v fused: [width, 3, heads, head_dim]
        "kernel": stacked(lambda p: np.stack(
            [take(f"{p}attn1.to_{n}.weight").T.reshape(width, heads, head_dim) for n in "qkv"], axis=1)),
        "bias": stacked(lambda p: np.stack([take(f"{p}attn1.to_{n}.bias").reshape(heads, head_dim)
                                            for n in "qkv"])),
    }
    params[("blocks", "attn", "out")] = {
        "kernel": stacked(lambda p: take(f"{p}attn1.to_out.0.weight").T.reshape(heads, head_dim, width)),
        "bias": stacked(lambda p: take(f"{p}attn1.to_out.0.bias")),
    }
    unexpected = sorted(set(tensors) - used)
    if unexpected:
        raise ValueError(f"the state dict has tensors the DiT paper's model does not: {unexpected[:10]}")

    model = ClassDiT(patch_size=config["patch_size"], in_channels=in_channels, width=width, depth=depth,
                     num_heads=heads, num_classes=num_classes, null_class=table.shape[0] > num_classes,
                     learn_sigma=out_channels == 2 * in_channels, frequency_shift=1,
                     mlp_norm_eps=config.get("norm_eps", 1e-5), **overrides)
    flat = {(*path, leaf): jnp.asarray(value, jnp.float32)
            for path, leaves in params.items() for leaf, value in leaves.items()}
    latent = jnp.zeros((1, model.patch_size, model.patch_size, in_channels))
    labels = jnp.zeros((1,), jnp.int32)
    expected = traverse_util.flatten_dict(nn.meta.unbox(
        jax.eval_shape(model.init, jax.random.key(0), latent, labels, labels)["params"]))
    wrong = {"/".join(k): (flat[k].shape if k in flat else None, v.shape) for k, v in expected.items()
             if k not in flat or flat[k].shape != v.shape}
    if wrong or set(flat) != set(expected):
        raise ValueError(f"ported parameters do not fit the model (ported shape, expected): {wrong}")
    return model, traverse_util.unflatten_dict(flat)


def _check_shared_embedders(tensors: dict[str, np.ndarray], depth: int) -> None:
    first = {name.split(_EMBEDDER_PREFIX, 1)[1]: value for name, value in tensors.items()
             if name.startswith(f"transformer_blocks.0.{_EMBEDDER_PREFIX}")}
    for i in range(1, depth):
        for name, value in first.items():
            other = tensors.get(f"transformer_blocks.{i}.{_EMBEDDER_PREFIX}{name}")
            if other is None or not np.array_equal(other, value):
                raise ValueError(
                    f"block {i}'s {_EMBEDDER_PREFIX}{name} differs from block 0's. DiT has one timestep "
                    "and label embedder; diffusers' copies of it must be equal in every block (as in "
                    "checkpoints converted from DiT). Copy block 0's into the others to port this one.")


def _to_numpy(value: Any) -> np.ndarray:
    """A torch tensor (any float dtype, any device) or array -> numpy f32."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, np.float32)
