"""T5 v1.1 and UMT5 text encoders in Flax, with a sharded loader for HF-format safetensors.

T5 v1.1 (google/t5-v1_1-xxl: the text encoder of PixArt-alpha and SD3) and UMT5 (google/umt5-xxl:
the text encoder of Wan) share one encoder stack: pre-norm blocks with RMS norms, attention without
the 1/sqrt(d) scaling (T5 folds it into the initialisation) plus a learned bias per bucket of relative
position, and a gated-GELU MLP. They differ in one place: T5's first layer owns the relative position
bias table and every layer uses it, while every UMT5 layer owns its own.

The XXL encoders hold 4.8B (T5) and 5.7B (UMT5) parameters, so `load_t5_params` can create each
parameter directly with its sharding on a mesh, reading from the checkpoint only the slice each device
holds: no device, nor the host, ever holds a whole copy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import operator
import pathlib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  Registers bfloat16 with numpy, so safetensors can read bf16 tensors.
import numpy as np
import sentencepiece
import tokenizers
from jax.sharding import Mesh, SingleDeviceSharding
from safetensors import safe_open

from sora_jax.models.attention import attention
from sora_jax.models.layers import RMSNorm
from sora_jax.models.text import TextEncoder, check_prompts

MODEL_TYPES = ("t5", "umt5")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# HF's feed_forward_proj -> the activation of the gate; 'gated-gelu' is HF's "gelu_new" (tanh form).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gated-gelu": functools.partial(jax.nn.gelu, approximate=True),
    "gated-silu": jax.nn.silu,
}
PATH_HELP = (
    "set config.text.path to a folder holding config.json, model.safetensors (or "
    "model.safetensors.index.json and its shards) and tokenizer.json or spiece.model"
)
# The encoder is always loaded from a checkpoint: initialisers only give shapes, dtypes and names.
_INIT = nn.initializers.normal(stddev=0.02)


def _dtype(name: str) -> Any:
    if name not in DTYPES:
        raise ValueError(f"Unknown dtype {name!r}; valid: {sorted(DTYPES)}.")
    return DTYPES[name]


@dataclasses.dataclass(frozen=True)
class T5Config:
    """The hyperparameters of a T5 v1.1 or UMT5 encoder, as read from an HF `config.json`.

    model_type: 't5' (one relative position bias table, owned by the first layer) or 'umt5' (one
      table per layer).
    """

    model_type: str
    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    feed_forward_proj: str
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    pad_token_id: int = 0
    eos_token_id: int = 1

    @classmethod
    def from_json(cls, path: str | pathlib.Path) -> T5Config:
        """Reads an HF T5/UMT5 `config.json`, refusing variants `T5Encoder` does not implement.

        Keys missing from older configs (google/t5-v1_1-* lack relative_attention_max_distance)
        take transformers' defaults.
        """
        with open(path) as f:
            cfg = json.load(f)
        if cfg.get("model_type") not in MODEL_TYPES:
            raise ValueError(
                f"{path}: model_type={cfg.get('model_type')!r} is not a T5 encoder; "
                f"T5Encoder implements model_type in {list(MODEL_TYPES)}."
            )
        # HF's default "relu" is the original T5's MLP; v1.1 and UMT5 use gated ones.
        if cfg.get("feed_forward_proj", "relu") not in ACTIVATIONS:
            raise ValueError(
                f"{path}: feed_forward_proj={cfg.get('feed_forward_proj', 'relu')!r} is not "
                f"implemented; T5Encoder implements {sorted(ACTIVATIONS)} (T5 v1.1, UMT5)."
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(
            f.name for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.name not in cfg
        )
        if missing:
            raise ValueError(f"{path} lacks the keys {missing}.")
        return cls(**{key: value for key, value in cfg.items() if key in fields})


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """The bucket of each (query, key) offset for bidirectional attention, as HF's T5 computes it.

    Half the buckets are for keys after the query; of each half, half are exact offsets and half
    grow logarithmically up to `max_distance`, beyond which offsets share the last bucket. The
    logarithms are taken in float32, like the PyTorch reference, so that bucket edges match exactly.

    Returns:
      [length, length] int32, indexed [query, key].
    """
    offset = np.arange(length)[None, :] - np.arange(length)[:, None]
    num_buckets //= 2
    buckets = (offset > 0) * num_buckets
    distance = np.abs(offset)
    max_exact = num_buckets // 2
    # Distances below max_exact take the other branch; the maximum keeps log() finite there.
    ratio = np.maximum(distance, max_exact).astype(np.float32) / np.float32(max_exact)
    scaled = (np.log(ratio) / np.float32(math.log(max_distance / max_exact))
              * np.float32(num_buckets - max_exact))
    large = np.minimum(max_exact + scaled.astype(np.int32), num_buckets - 1)
    return (buckets + np.where(distance < max_exact, distance, large)).astype(np.int32)


def relative_position_bias(table: jax.Array, length: int, config: T5Config) -> jax.Array:
    """table: [num_buckets, heads] -> the attention bias [1, heads, length, length] float32."""
    buckets = relative_position_buckets(
        length, config.relative_attention_num_buckets, config.relative_attention_max_distance
    )
    return jnp.transpose(table.astype(jnp.float32)[buckets], (2, 0, 1))[None]


def _bias_table(module: nn.Module, config: T5Config, dtype: Any) -> jax.Array:
    return module.param(
        "relative_attention_bias",
        nn.with_logical_partitioning(_INIT, (None, "heads")),
        (config.relative_attention_num_buckets, config.num_heads),
        dtype,
    )


class T5Layer(nn.Module):
    """One pre-norm T5 block: x += Attn(RMSNorm(x)); x += MLP(RMSNorm(x)). Written as a scan body.

    Matmuls take their operands in `dtype` and accumulate in float32; norms, softmax and the
    residual stream are float32.
    """

    config: T5Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, mask: jax.Array, position_bias: jax.Array | None
    ) -> tuple[jax.Array, None]:
        """Runs the block.

        Args:
          x: [batch, length, d_model] float32.
          mask: [batch, length] bool, True at real tokens; padding keys are ignored by attention.
          position_bias: [1, heads, length, length] float32, T5's shared bias; None for UMT5, whose
            layers each own a table.

        Returns:
          (x, None), the carry and output of one step of nn.scan.
        """
        cfg = self.config

        def project(h, name, spec, shape, axes):
            kernel = self.param(name, nn.with_logical_partitioning(_INIT, axes), shape, self.dtype)
            return jnp.einsum(spec, h.astype(self.dtype), kernel, preferred_element_type=jnp.float32)

        if position_bias is None:
            position_bias = relative_position_bias(_bias_table(self, cfg, self.dtype), x.shape[1], cfg)
        h = RMSNorm(epsilon=cfg.layer_norm_epsilon, name="attention_norm")(x)
        heads = (cfg.d_model, cfg.num_heads, cfg.d_kv)
        q, k, v = (
            project(h, name, "bld,dhk->blhk", heads, ("embed", "heads", "head_dim")).astype(self.dtype)
            for name in ("query", "key", "value")
        )
        # Queries at padding positions still attend to the valid keys, so no row is fully masked.
        attn = attention(q, k, v, mask=mask[:, None, None, :], bias=position_bias, scale=1.0)
        x = x + project(attn, "attention_out", "blhk,hkd->bld", heads[1:] + heads[:1],
                        ("heads", "head_dim", "embed"))

        h = RMSNorm(epsilon=cfg.layer_norm_epsilon, name="mlp_norm")(x)
        mlp_in = (cfg.d_model, cfg.d_ff), ("embed", "mlp")
        gate = project(h, "mlp_gate", "bld,df->blf", *mlp_in)
        h = ACTIVATIONS[cfg.feed_forward_proj](gate) * project(h, "mlp_in", "bld,df->blf", *mlp_in)
        x = x + project(h, "mlp_out", "blf,fd->bld", (cfg.d_ff, cfg.d_model), ("mlp", "embed"))
        return x, None


class T5Encoder(nn.Module):
    """The T5 v1.1 / UMT5 encoder stack: token ids -> last hidden states.

    Parameters are created in `dtype` (float32 or bfloat16), except the norms' scales (float32).
    The layers' parameters are stacked along a leading `num_layers` axis, the layout `nn.scan` makes
    and every transformer in the package shares; `unroll` chooses whether the computation loops over
    them (the default: an XXL encoder's 24 layers would otherwise compile 24 copies) or is unrolled.
    """

    config: T5Config
    dtype: Any = jnp.float32
    unroll: int | bool = 1

    @nn.compact
    def __call__(self, input_ids: jax.Array, mask: jax.Array) -> jax.Array:
        """Runs the encoder.

        Args:
          input_ids: [batch, length] int token ids.
          mask: [batch, length] bool, True at real tokens; padding keys are ignored by attention.

        Returns:
          [batch, length, d_model] float32 last hidden states (padding positions are computed too).
        """
        cfg = self.config
        embedding = self.param(
            "token_embedding",
            nn.with_logical_partitioning(_INIT, ("vocab", "embed")),
            (cfg.vocab_size, cfg.d_model),
            self.dtype,
        )
        x = jnp.take(embedding, input_ids, axis=0).astype(jnp.float32)
        shared_bias = None
        if cfg.model_type == "t5":
            shared_bias = relative_position_bias(_bias_table(self, cfg, self.dtype), x.shape[1], cfg)
        layers = nn.scan(
            T5Layer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast),
            length=cfg.num_layers,
            unroll=self.unroll,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = layers(cfg, self.dtype, name="layers")(x, mask, shared_bias)
        return RMSNorm(epsilon=cfg.layer_norm_epsilon, name="final_norm")(x)


# --------------------------------------------------------------------------------------------------
# Loading HF-format safetensors.


class _Layout(NamedTuple):
    """How an HF tensor becomes a Flax parameter: optionally split one axis of size heads * d_kv
    into (heads, d_kv), then transpose so that Flax axis j is axis perm[j] of the split tensor."""

    split: int | None
    perm: tuple[int, ...]


_SAME_1D = _Layout(None, (0,))
_SAME_2D = _Layout(None, (0, 1))
# torch Linear stores its weight as [out, in]; our kernels are [in, out].
_TRANSPOSED = _Layout(None, (1, 0))
_HEADS_OUT = _Layout(0, (2, 0, 1))  # q, k, v: [heads * d_kv, d_model] -> [d_model, heads, d_kv]
_HEADS_IN = _Layout(1, (1, 2, 0))  # o: [d_model, heads * d_kv] -> [heads, d_kv, d_model]

# Names inside `encoder.block.{i}.` -> (path inside the stacked "layers" params, layout).
_LAYER_TENSORS: dict[str, tuple[tuple[str, ...], _Layout]] = {
    "layer.0.layer_norm.weight": (("attention_norm", "scale"), _SAME_1D),
    "layer.0.SelfAttention.q.weight": (("query",), _HEADS_OUT),
    "layer.0.SelfAttention.k.weight": (("key",), _HEADS_OUT),
    "layer.0.SelfAttention.v.weight": (("value",), _HEADS_OUT),
    "layer.0.SelfAttention.o.weight": (("attention_out",), _HEADS_IN),
    "layer.1.layer_norm.weight": (("mlp_norm", "scale"), _SAME_1D),
    "layer.1.DenseReluDense.wi_0.weight": (("mlp_gate",), _TRANSPOSED),
    "layer.1.DenseReluDense.wi_1.weight": (("mlp_in",), _TRANSPOSED),
    "layer.1.DenseReluDense.wo.weight": (("mlp_out",), _TRANSPOSED),
}
_BIAS_TENSOR = "layer.0.SelfAttention.relative_attention_bias.weight"
# The token embedding is `shared.weight` (tied with the decoder's); some exports also or only
# store the encoder's alias of it.
_EMBEDDING_NAMES = ("shared.weight", "encoder.embed_tokens.weight")
# Parts of full encoder-decoder checkpoints that the encoder does not use.
_UNUSED_PREFIXES = ("decoder.", "lm_head.")


class _Entry(NamedTuple):
    """One Flax parameter: its path, and its checkpoint tensor per layer (one name if not stacked)."""

    path: tuple[str, ...]
    names: tuple[str, ...]
    stacked: bool
    layout: _Layout


def _entries(config: T5Config, names: set[str]) -> list[_Entry]:
    """The parameters of `T5Encoder(config)`, read from a checkpoint holding tensors `names`."""
    embedding = next((n for n in _EMBEDDING_NAMES if n in names), _EMBEDDING_NAMES[0])
    layer_tensors = dict(_LAYER_TENSORS)
    entries = [
        _Entry(("token_embedding",), (embedding,), False, _SAME_2D),
        _Entry(("final_norm", "scale"), ("encoder.final_layer_norm.weight",), False, _SAME_1D),
    ]
    if config.model_type == "t5":
        entries.append(
            _Entry(("relative_attention_bias",), (f"encoder.block.0.{_BIAS_TENSOR}",), False, _SAME_2D)
        )
    else:
        layer_tensors[_BIAS_TENSOR] = (("relative_attention_bias",), _SAME_2D)
    for name, (path, layout) in layer_tensors.items():
        per_layer = tuple(f"encoder.block.{i}.{name}" for i in range(config.num_layers))
        entries.append(_Entry(("layers",) + path, per_layer, True, layout))
    return entries


def _hf_shape(shape: tuple[int, ...], layout: _Layout) -> tuple[int, ...]:
    """The HF tensor shape whose Flax layout has `shape` (one layer's)."""
    split = [0] * len(shape)
    for flax_axis, split_axis in enumerate(layout.perm):
        split[split_axis] = shape[flax_axis]
    if layout.split is None:
        return tuple(split)
    a = layout.split
    return tuple(split[:a]) + (split[a] * split[a + 1],) + tuple(split[a + 2:])


def _read_block(tensor: Any, layout: _Layout, index: tuple[slice, ...], d_kv: int) -> np.ndarray:
    """The block `index` (start:stop slices, one per Flax axis) of the Flax view of one HF tensor,
    reading from the file only the rows and columns it covers (whole heads along a split axis)."""
    split_index = [slice(None)] * len(index)
    for flax_axis, split_axis in enumerate(layout.perm):
        split_index[split_axis] = index[flax_axis]
    if layout.split is None:
        return tensor[tuple(split_index)].transpose(layout.perm)
    a = layout.split
    heads, dims = split_index[a], split_index[a + 1]
    rows = slice(heads.start * d_kv, heads.stop * d_kv)
    block = tensor[tuple(split_index[:a] + [rows] + split_index[a + 2:])]
    block = block.reshape(block.shape[:a] + (heads.stop - heads.start, d_kv) + block.shape[a + 1:])
    return block[(slice(None),) * (a + 1) + (dims,)].transpose(layout.perm)


def _weight_map(model_dir: pathlib.Path) -> dict[str, str]:
    """Tensor name -> the safetensors file in `model_dir` that holds it."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        with open(index) as f:
            return json.load(f)["weight_map"]
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(
            f"{model_dir} holds neither model.safetensors nor model.safetensors.index.json."
        )
    with safe_open(str(single), "numpy") as f:
        return {name: single.name for name in f.keys()}


def load_t5_params(
    model_dir: str | pathlib.Path,
    config: T5Config,
    *,
    dtype: str = "float32",
    mesh: Mesh | None = None,
    rules: Sequence[tuple[str, Any]] | None = None,
) -> dict:
    """Loads the encoder of an HF T5/UMT5 safetensors checkpoint as `T5Encoder` params.

    Accepts `T5EncoderModel`, `UMT5EncoderModel` and full `T5ForConditionalGeneration`-style
    checkpoints (the decoder and LM head are ignored), in one `model.safetensors` or sharded with a
    `model.safetensors.index.json`, stored in any float dtype.

    Args:
      model_dir: the checkpoint's folder.
      config: the encoder's hyperparameters; every tensor's shape is checked against them.
      dtype: 'float32' or 'bfloat16', the parameters' dtype (norm scales stay float32).
      mesh, rules: with both, each parameter is created directly with the sharding its logical
        axis names map to, every device reading only its own slice from the files; without, each
        parameter is a whole array on the default device.

    Returns:
      The `params` collection of `T5Encoder(config, dtype)`.

    Raises:
      ValueError: naming every missing key, unexpected key and shape mismatch.
    """
    if (mesh is None) != (rules is None):
        raise ValueError("load_t5_params shards parameters when given both mesh and rules, not one.")
    model_dir = pathlib.Path(model_dir)
    weight_map = _weight_map(model_dir)
    entries = _entries(config, set(weight_map))
    expected = {name for entry in entries for name in entry.names}
    missing = sorted(expected - set(weight_map))
    unexpected = sorted(
        name for name in set(weight_map) - expected
        if not name.startswith(_UNUSED_PREFIXES) and name not in _EMBEDDING_NAMES
    )
    if missing or unexpected:
        raise ValueError(
            f"{model_dir} does not match a {config.num_layers}-layer {config.model_type} encoder. "
            f"Missing keys: {missing or 'none'}. Unexpected keys: {unexpected or 'none'}."
        )

    model = T5Encoder(config, _dtype(dtype))
    dummy = jnp.zeros((1, 1), jnp.int32)
    boxed = jax.eval_shape(model.init, jax.random.key(0), dummy, dummy.astype(bool))["params"]
    if mesh is None:
        shardings = jax.tree.map(lambda _: SingleDeviceSharding(jax.local_devices()[0]), nn.unbox(boxed))
    else:
        shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    abstract = nn.unbox(boxed)
    get = lambda tree, path: functools.reduce(operator.getitem, path, tree)

    with contextlib.ExitStack() as stack:
        files = {
            file: stack.enter_context(safe_open(str(model_dir / file), "numpy"))
            for file in sorted(set(weight_map[name] for name in expected))
        }
        tensor = lambda name: files[weight_map[name]].get_slice(name)

        mismatches = []
        for entry in entries:
            shape = get(abstract, entry.path).shape
            hf_shape = _hf_shape(shape[1:] if entry.stacked else shape, entry.layout)
            for name in entry.names:
                found = tuple(tensor(name).get_shape())
                if found != hf_shape:
                    mismatches.append(f"{name}: {found} in the checkpoint, {hf_shape} expected")
        if mismatches:
            raise ValueError("Checkpoint shapes do not match the config: " + "; ".join(mismatches))

        def read(entry: _Entry, leaf: jax.ShapeDtypeStruct, index: tuple[slice, ...]) -> np.ndarray:
            index = tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, leaf.shape))
            if entry.stacked:
                blocks = [
                    _read_block(tensor(name), entry.layout, index[1:], config.d_kv)
                    for name in entry.names[index[0]]
                ]
                block = np.stack(blocks)
            else:
                block = _read_block(tensor(entry.names[0]), entry.layout, index, config.d_kv)
            return np.asarray(block, leaf.dtype)

        params: dict = {}
        for entry in entries:
            leaf = get(abstract, entry.path)
            parent = functools.reduce(lambda node, key: node.setdefault(key, {}), entry.path[:-1], params)
            parent[entry.path[-1]] = jax.make_array_from_callback(
                leaf.shape, get(shardings, entry.path), functools.partial(read, entry, leaf)
            )
    return params


# --------------------------------------------------------------------------------------------------
# The text encoder.


def t5_model_dir(path: str | pathlib.Path | None) -> pathlib.Path:
    """Checks that `path` is a folder with a T5/UMT5 checkpoint's config.json."""
    if path is None:
        raise ValueError(f"The T5 and UMT5 text encoders load a checkpoint folder: {PATH_HELP}.")
    model_dir = pathlib.Path(path)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir / 'config.json'} does not exist: {PATH_HELP}.")
    return model_dir


def t5_config(model_dir: pathlib.Path, model_type: str | None = None) -> T5Config:
    """Reads `model_dir`/config.json, checking its model_type when one is asked for."""
    config = T5Config.from_json(model_dir / "config.json")
    if model_type is not None and config.model_type != model_type:
        raise ValueError(
            f"{model_dir / 'config.json'} has model_type={config.model_type!r}, but the "
            f"{model_type!r} text encoder was asked for; use {config.model_type!r} for it."
        )
    return config


def t5_tokenizer(model_dir: pathlib.Path) -> Callable[[list[str]], list[list[int]]]:
    """The checkpoint's own tokenizer as prompts -> token ids without special tokens.

    `tokenizer.json` runs through the `tokenizers` package, else `spiece.model` through
    sentencepiece; both are the same sentencepiece unigram model.
    """
    if (model_dir / "tokenizer.json").is_file():
        tokenizer = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        tokenizer.no_truncation()
        tokenizer.no_padding()
        return lambda prompts: [
            e.ids for e in tokenizer.encode_batch(prompts, add_special_tokens=False)
        ]
    if (model_dir / "spiece.model").is_file():
        processor = sentencepiece.SentencePieceProcessor(model_file=str(model_dir / "spiece.model"))
        return lambda prompts: processor.encode(prompts)
    raise FileNotFoundError(f"{model_dir} holds neither tokenizer.json nor spiece.model: {PATH_HELP}.")


class T5TextEncoder(TextEncoder):
    """A T5 v1.1 or UMT5 checkpoint's last hidden states (token-level) as conditioning tokens.

    Tokenization runs on the host with the checkpoint's own tokenizer; every prompt ends with EOS,
    as with HF's T5 tokenizer. The forward is jitted, compiling once per batch size.
    """

    @classmethod
    def default_dim(cls, path: str | pathlib.Path | None = None, model_type: str | None = None) -> int:
        return t5_config(t5_model_dir(path), model_type).d_model

    def __init__(
        self,
        max_length: int = 32,
        path: str | pathlib.Path | None = None,
        dtype: str = "float32",
        mesh: Mesh | None = None,
        rules: Sequence[tuple[str, Any]] | None = None,
        *,
        model_type: str | None = None,
    ):
        """Loads the tokenizer and weights.

        Args:
          max_length: tokens per prompt including the final EOS, at least 2.
          path: the checkpoint's folder: config.json, model.safetensors (or an index and shards),
            and tokenizer.json or spiece.model.
          dtype: 'float32' or 'bfloat16', of the parameters and matmul operands; outputs are float32.
          mesh, rules: shard the parameters by their logical axis names (see `load_t5_params`).
          model_type: 't5' or 'umt5' to check the checkpoint against; None accepts either.
        """
        model_dir = t5_model_dir(path)
        self.config = t5_config(model_dir, model_type)
        if max_length < 2:
            raise ValueError(f"max_length={max_length} must be at least 2: a token and the EOS.")
        self.dim = self.config.d_model
        self.max_length = max_length
        self._tokenize = t5_tokenizer(model_dir)

        self.model = T5Encoder(self.config, _dtype(dtype))
        self.params = load_t5_params(model_dir, self.config, dtype=dtype, mesh=mesh, rules=rules)
        self._forward = jax.jit(self._apply)

    def _apply(self, params: dict, input_ids: jax.Array, mask: jax.Array) -> jax.Array:
        tokens = self.model.apply({"params": params}, input_ids, mask)
        # Padding states carry no prompt content of their own; zeros make that explicit, so cached
        # embeddings and any consumer that forgets the mask see nothing there.
        return jnp.where(mask[..., None], tokens, 0.0)

    def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Tokenizes, appending EOS, padding and truncating to `max_length` (the EOS is kept as the
        last token, as HF's tokenizer does) and logging a warning the first time it truncates.

        Returns:
          input_ids: [batch, max_length] int32.
          mask: [batch, max_length] bool, True at real tokens.
        """
        check_prompts(prompts)
        cfg, length = self.config, self.max_length
        pieces = self._tokenize(list(prompts))
        truncated = [i for i, p in enumerate(pieces) if len(p) >= length]
        self.warn_truncated(prompts, truncated)
        input_ids = np.full((len(pieces), length), cfg.pad_token_id, np.int32)
        mask = np.zeros((len(pieces), length), bool)
        for row, p in enumerate(pieces):
            p = p[: length - 1] + [cfg.eos_token_id]
            input_ids[row, : len(p)] = p
            mask[row, : len(p)] = True
        return input_ids, mask

    def encode(self, prompts: Sequence[str]) -> tuple[jax.Array, jax.Array]:
        input_ids, mask = self.tokenize(prompts)
        mask = jnp.asarray(mask)
        return self._forward(self.params, input_ids, mask), mask
