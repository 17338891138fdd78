"""A dataset encoded once: VAE latents, captions and frozen text embeddings, as array_record.

Training a DiT on a frozen VAE and a frozen text encoder re-encodes the same clips every epoch;
the cache stores what the DiT actually reads, and `pipeline.make_loader(latent_cache=DIR)` serves
it in place of pixels:

    DIR/metadata.json                       what was encoded, with which VAE and text encoder
    DIR/{split}.array_record                one msgpack record per clip:
        latent float32 [t, h, w, c], caption str, text float16 [L, D], text_mask bool [L], labels

    python -m sora_jax.cache_latents --config=configs/moving_shapes.py   # writes config.data.latent_cache

A cache is written to a temporary folder and renamed into place once complete, so an interrupted
run never leaves a partial cache that looks finished.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import grain
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from flax import serialization

METADATA = "metadata.json"


def split_path(root: str, split: str) -> str:
    return os.path.join(root, f"{split}.array_record")


def read_metadata(root: str) -> dict[str, Any]:
    path = os.path.join(root, METADATA)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"No latent cache at {root!r} (no {METADATA}). Write it with "
            "`python -m sora_jax.cache_latents --config=<the DiT config>`, or unset "
            "config.data.latent_cache to encode clips while training.")
    with open(path) as f:
        return json.load(f)


def encode_record(example: dict[str, Any]) -> bytes:
    return serialization.msgpack_serialize(example)


@dataclasses.dataclass(frozen=True)
class DecodeRecord(grain.transforms.Map):
    """A cached record -> {'latent': float32, 'caption': str, 'text': float32, 'text_mask': bool,
    labels: int32}, the host batch layout of the pixel pipeline with latents for video."""

    def map(self, record: bytes) -> dict[str, Any]:
        example = serialization.msgpack_restore(record)
        out = {k: (np.int32(v) if np.ndim(v) == 0 and not isinstance(v, str) else v)
               for k, v in example.items()}
        out["latent"] = np.asarray(example["latent"], np.float32)
        if "text" in example:
            out["text"] = np.asarray(example["text"], np.float32)
        return out


def write_cache(root: str, splits: dict[str, Iterable[dict[str, Any]]], *,
                encode_video: Callable[[np.ndarray], np.ndarray],
                encode_text: Callable[[list[str]], tuple[np.ndarray, np.ndarray]] | None,
                metadata: dict[str, Any], progress: Callable[[str, int], None] | None = None) -> str:
    """Encodes every host batch of every split ({'video', 'caption', labels...}) into `root`.

    encode_text=None stores captions only (for a text encoder that is trained, not frozen).
    Returns root. Refuses to overwrite an existing cache.
    """
    if os.path.exists(os.path.join(root, METADATA)):
        raise FileExistsError(f"A latent cache already exists at {root!r}; delete it to rebuild.")
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(root) + ".tmp-", dir=parent)
    try:
        counts, latent_shape = {}, None
        for split, batches in splits.items():
            writer = ArrayRecordWriter(split_path(tmp, split), "group_size:1")
            count = 0
            for batch in batches:
                latents = np.asarray(encode_video(batch["video"]), np.float32)
                latent_shape = list(latents.shape[1:])
                text = encode_text(list(batch["caption"])) if encode_text else None
                if text is not None:
                    text = (_to_float16(np.asarray(text[0])), text[1])
                for i in range(len(latents)):
                    record = {k: (str(v[i]) if k == "caption" else int(v[i]))
                              for k, v in batch.items() if k != "video"}
                    record["latent"] = latents[i]
                    if text is not None:
                        record["text"] = text[0][i]
                        record["text_mask"] = np.asarray(text[1][i], bool)
                    writer.write(encode_record(record))
                count += len(latents)
                if progress:
                    progress(split, count)
            writer.close()
            counts[split] = count
        with open(os.path.join(tmp, METADATA), "w") as f:
            json.dump({**metadata, "latent_shape": latent_shape, "num_examples": counts,
                       "text_embeddings": encode_text is not None}, f, indent=2)
        if os.path.exists(root):  # an empty or unfinished folder: never one with metadata
            shutil.rmtree(root)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def _to_float16(tokens: np.ndarray) -> np.ndarray:
    """Text embeddings are stored in float16 (half the bytes); refuses values it cannot hold."""
    peak = float(np.max(np.abs(tokens)))
    if not peak <= np.finfo(np.float16).max:  # also catches NaN
        raise ValueError(f"Text embeddings reach {peak:.3g}, not finite in float16 (max 65504): "
                         "the latent cache cannot store them. Check the text encoder's outputs "
                         "(its dtype and weights).")
    return tokens.astype(np.float16)


def data_source(root: str, split: str) -> grain.sources.ArrayRecordDataSource:
    metadata = read_metadata(root)
    if split not in metadata["num_examples"]:
        raise ValueError(f"The latent cache at {root!r} has splits {sorted(metadata['num_examples'])}, "
                         f"not {split!r}.")
    return grain.sources.ArrayRecordDataSource([split_path(root, split)])


def check_matches(root: str, *, latent_shape, text: Mapping[str, Any]) -> None:
    """The cache must hold what the DiT config expects; names the mismatch and the fix.

    Args:
      root: the cache folder.
      latent_shape: (t, h, w, c) latents of one clip, as the config's autoencoder makes them.
      text: what identifies the config's text embeddings (encoder, checkpoint, dtype, max_length;
        `metadata["text"]` of a cache written for it).
    """
    metadata = read_metadata(root)
    problems = []
    if tuple(metadata["latent_shape"]) != tuple(latent_shape):
        problems.append(f"latents {tuple(metadata['latent_shape'])} vs the config's "
                        f"{tuple(latent_shape)}")
    if metadata["text_embeddings"] and metadata.get("text") != dict(text):
        problems.append(f"text embeddings of {metadata.get('text')} vs the config's {dict(text)}")
    if problems:
        raise ValueError(f"The latent cache at {root!r} does not match this config: "
                         f"{'; '.join(problems)}. Rebuild it (delete the folder and run "
                         "`python -m sora_jax.cache_latents --config=...`) or point "
                         "config.data.latent_cache elsewhere.")
