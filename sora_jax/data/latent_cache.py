"""A dataset encoded once: VAE latents, captions and frozen text embeddings, as array_record.

Training a DiT on a frozen VAE and a frozen text encoder re-encodes the same clips every epoch;
the cache stores what the DiT actually reads, and `pipeline.make_loader(latent_cache=DIR)` serves
it in place of pixels:

    DIR/metadata.json                       what was encoded, with which VAE and text encoder
    DIR/{split}.array_record                one msgpack record per clip:
        latent float32 [t, h, w, c], caption str, text float16 [L, D], text_mask bool [L], labels;
        for datasets of many sizes also frames, height, width (int) and fps (float) of the clip;
        for configs with end_image masks also end_latent float32 [1, h, w, c], the lone encoding
        of the clip's frame `metadata["end_frame"]` (diffusion/masks.py)

    python -m sora_jax.cache_latents --config=configs/moving_shapes.py   # writes config.data.latent_cache

Clips of many sizes (a dataset read with `collate='list'`) are regrouped by size and encoded a
full batch of one size at a time, so records are not in the dataset's order; `metadata["latent_shape"]` is then None and `metadata["latent_sizes"]` lists the
latent shapes met.

A cache is written to a temporary folder and renamed into place once complete, so an interrupted
run never leaves a partial cache that looks finished.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
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
        out = {k: (np.float32(v) if isinstance(v, float) else np.int32(v) if np.ndim(v) == 0
                   and not isinstance(v, str) else v) for k, v in example.items()}
        out["latent"] = np.asarray(example["latent"], np.float32)
        if "end_latent" in example:
            out["end_latent"] = np.asarray(example["end_latent"], np.float32)
        if "text" in example:
            out["text"] = np.asarray(example["text"], np.float32)
        return out


def encode_by_size(videos: Sequence[np.ndarray], encode_video: Callable[[np.ndarray], np.ndarray],
                   min_batch: int = 8) -> list[np.ndarray]:
    """Latents of clips of any sizes, in their order: one `encode_video` call per distinct shape.

    Each call's batch is padded (repeating its last clip) to a power of two of at least
    `min_batch`, so a jitted encoder compiles one or two batch sizes per clip shape rather than one
    per count met.
    """
    groups: dict[tuple[int, ...], list[int]] = collections.defaultdict(list)
    for i, video in enumerate(videos):
        groups[np.shape(video)].append(i)
    latents: list[np.ndarray] = [None] * len(videos)  # type: ignore[list-item]
    for indices in groups.values():
        size = max(min_batch, 2 ** math.ceil(math.log2(len(indices))))
        padded = indices + indices[-1:] * (size - len(indices))
        encoded = np.asarray(encode_video(np.stack([videos[i] for i in padded])), np.float32)
        for i, latent in zip(indices, encoded):
            latents[i] = latent
    return latents


def _by_size(batches: Iterable[list[Mapping[str, Any]]]) -> Iterator[list[Mapping[str, Any]]]:
    """Examples of many sizes regrouped into batches of one size each, as many per batch as the
    input's: full batches for the encoder, in an order the cache does not need to keep."""
    pending: dict[tuple[int, ...], list[Mapping[str, Any]]] = collections.defaultdict(list)
    for batch in batches:
        for example in batch:
            group = pending[np.shape(example["video"])]
            group.append(example)
            if len(group) == len(batch):
                yield pending.pop(np.shape(example["video"]))
    yield from pending.values()


def _examples(batch: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """A host batch, stacked (a mapping of arrays) or collated as a list, as a list of examples."""
    if isinstance(batch, Mapping):
        return [{k: v[i] for k, v in batch.items()} for i in range(len(batch["video"]))]
    return list(batch)


def _scalar(key: str, value: Any) -> Any:
    if key == "caption":
        return str(value)
    return float(value) if np.issubdtype(np.asarray(value).dtype, np.floating) else int(value)


def write_cache(root: str, splits: dict[str, Iterable[Any]], *,
                encode_video: Callable[[np.ndarray], np.ndarray],
                encode_text: Callable[[list[str]], tuple[np.ndarray, np.ndarray]] | None,
                metadata: dict[str, Any], progress: Callable[[str, int], None] | None = None,
                end_frame: int | None = None) -> str:
    """Encodes every host batch of every split into `root`.

    A batch is a mapping of stacked arrays ({'video', 'caption', labels...}) or a list of examples
    (clips of many sizes, each with its 'frames', 'height', 'width', 'fps'), kept in the records.
    encode_text=None stores captions only (for a text encoder that is trained, not frozen).
    end_frame: also store each clip's frame `end_frame` encoded on its own ('end_latent'; clips of
    one size only).
    Returns root. Refuses to overwrite an existing cache.
    """
    if os.path.exists(os.path.join(root, METADATA)):
        raise FileExistsError(f"A latent cache already exists at {root!r}; delete it to rebuild.")
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(root) + ".tmp-", dir=parent)
    try:
        counts, shapes, sized = {}, set(), False
        for split, batches in splits.items():
            writer = ArrayRecordWriter(split_path(tmp, split), "group_size:1")
            count = 0
            batches = iter(batches)
            first = next(batches, None)
            batches = itertools.chain([] if first is None else [first], batches)
            if first is not None and not isinstance(first, Mapping):  # clips of many sizes
                sized, batches = True, _by_size(batches)
            for batch in batches:
                examples = _examples(batch)
                latents = encode_by_size([e["video"] for e in examples], encode_video)
                if end_frame is not None:
                    if sized:
                        raise ValueError("End images are stored for clips of one size only.")
                    ends = encode_by_size([e["video"][end_frame:end_frame + 1] for e in examples],
                                          encode_video)
                text = encode_text([str(e["caption"]) for e in examples]) if encode_text else None
                if text is not None:
                    text = (_to_float16(np.asarray(text[0])), text[1])
                for i, (example, latent) in enumerate(zip(examples, latents)):
                    record = {k: _scalar(k, v) for k, v in example.items() if k != "video"}
                    record["latent"] = latent
                    if end_frame is not None:
                        record["end_latent"] = ends[i]
                    shapes.add(latent.shape)
                    if text is not None:
                        record["text"] = text[0][i]
                        record["text_mask"] = np.asarray(text[1][i], bool)
                    writer.write(encode_record(record))
                count += len(examples)
                if progress:
                    progress(split, count)
            writer.close()
            counts[split] = count
        sizes = sorted(map(list, shapes))
        with open(os.path.join(tmp, METADATA), "w") as f:
            json.dump({**metadata, "latent_shape": None if sized else sizes[0] if sizes else None,
                       "latent_sizes": sizes, "clip_sizes": sized, "num_examples": counts,
                       "end_frame": end_frame,
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


def check_matches(root: str, *, latent_shape: Sequence[int | None],
                  text: Mapping[str, Any], end_frame: int | None = None) -> None:
    """The cache must hold what the DiT config expects; names the mismatch and the fix.

    Args:
      root: the cache folder.
      latent_shape: (t, h, w, c) latents of one clip, as the config's autoencoder makes them; for
        clips of many sizes (t, h, w) are None, and the cache must keep each clip's size.
      text: what identifies the config's text embeddings (encoder, checkpoint, dtype, max_length;
        `metadata["text"]` of a cache written for it).
      end_frame: the frame whose lone encoding the config's end_image masks need, or None.
    """
    metadata = read_metadata(root)
    problems = []
    mixed = any(d is None for d in latent_shape)
    cached = metadata["latent_shape"]
    if mixed and not metadata.get("clip_sizes"):
        problems.append(f"clips of one size {tuple(cached)} without their sizes vs the config's "
                        "clips of many sizes")
    elif not mixed and cached is None:
        problems.append(f"clips of many sizes vs the config's latents {tuple(latent_shape)}")
    elif mixed and any(s[-1] != latent_shape[-1] for s in metadata.get("latent_sizes", [])):
        problems.append(f"latents of {sorted({s[-1] for s in metadata['latent_sizes']})} channels "
                        f"vs the config's {latent_shape[-1]}")
    elif not mixed and tuple(cached) != tuple(latent_shape):
        problems.append(f"latents {tuple(cached)} vs the config's {tuple(latent_shape)}")
    if metadata["text_embeddings"] and metadata.get("text") != dict(text):
        problems.append(f"text embeddings of {metadata.get('text')} vs the config's {dict(text)}")
    if end_frame is not None and metadata.get("end_frame") != end_frame:
        problems.append(f"end images of frame {metadata.get('end_frame')} vs the config's end_image "
                        f"masks, which need frame {end_frame}")
    if problems:
        raise ValueError(f"The latent cache at {root!r} does not match this config: "
                         f"{'; '.join(problems)}. Rebuild it (delete the folder and run "
                         "`python -m sora_jax.cache_latents --config=...`) or point "
                         "config.data.latent_cache elsewhere.")
