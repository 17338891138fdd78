"""Input pipeline: tensorflow-datasets builders, written as array_record and read with grain.

    loader = make_loader(name='moving_shapes', builder_config='f9_s32', data_dir=None,
                         split='train', batch_size=32, seed=0)
    batch = next(iter(loader))   # {'video': float32 [32, 9, 32, 32, 3] in [-1, 1],
                                 #  'caption': str [32], 'colour': int32 [32], ...}

Any tfds builder whose examples have a uint8 'video' [T, H, W, 3] and a Text 'caption' works; its
ClassLabel features become int32 labels in the batch. Batch sizes here are global: on several
hosts each reads its own rows of every global batch (`GlobalBatchSampler`), so any number of hosts
trains on the same batches. The loader's iterator has `get_state()` / `set_state()`, which the
training checkpoint stores (one file per process) so a resumed run sees the same next batch.
"""

import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds

from sora_jax.data import latent_cache as latent_cache_lib
from sora_jax.data import moving_shapes  # noqa: F401  (registers the builder with tfds)
from sora_jax.data import video_folder  # registers the builder with tfds


SIZE_KEYS = ("frames", "height", "width", "fps")


def data_kwargs(data: Any) -> dict[str, Any]:
    """The dataset arguments of a config's `data` section: name, builder_config, data_dir and, where
    set, latent_cache (see data/latent_cache.py).

    For name='video_folder', builder_config becomes a `video_folder.VideoFolderConfig` named by
    data.builder_config, from data.folder and, where set, data.max_area, max_frames, target_fps
    and validation_fraction (see data/video_folder.py).
    """
    builder_config = data.builder_config
    if data.name == "video_folder":
        if not data.get("folder"):
            raise ValueError("config.data.name='video_folder' needs config.data.folder: "
                             f"{video_folder.LAYOUT}")
        options = {k: data[k] for k in video_folder.OPTIONS if data.get(k) is not None}
        builder_config = video_folder.VideoFolderConfig.for_folder(
            data.folder, name=data.builder_config, **options)
    kw = dict(name=data.name, builder_config=builder_config, data_dir=data.data_dir)
    if data.get("latent_cache"):
        kw["latent_cache"] = data.latent_cache
    return kw


def clip_shape(name: str, builder_config: str | tfds.core.BuilderConfig,
               data_dir: str | None = None,
               latent_cache: str | None = None) -> tuple[int | None, ...]:
    """(frames, height, width, 3) of the dataset's clips, generating the dataset if needed; None
    for sizes that vary per example (mixed-size datasets store each one's 'frames', 'height' and
    'width')."""
    del latent_cache
    return tuple(prepare(name, builder_config, data_dir).info.features["video"].shape)


def get_builder(name: str, builder_config: str | tfds.core.BuilderConfig,
                data_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """The tfds builder `name/builder_config` in `data_dir` (default ~/tensorflow_datasets);
    builder_config is a config's name or the config itself (video_folder's, from `data_kwargs`)."""
    return tfds.builder(name, config=builder_config, data_dir=data_dir,
                        file_format="array_record")


def prepare(name: str, builder_config: str | tfds.core.BuilderConfig,
            data_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """The builder, after generating its data if not yet there (generated locally, no download).

    On several hosts, prepare once before launching (or give each host its own data_dir).
    """
    builder = get_builder(name, builder_config, data_dir)
    if not builder.is_prepared():
        print(f"Generating {builder.info.full_name} into {builder.data_dir}", flush=True)
        builder.download_and_prepare(file_format="array_record")
    return builder


def _label_names(builder: tfds.core.DatasetBuilder) -> tuple[str, ...]:
    return tuple(key for key, feature in builder.info.features.items()
                 if isinstance(feature, tfds.features.ClassLabel))


@dataclasses.dataclass(frozen=True)
class DecodeExample(grain.transforms.Map):
    """A stored example -> {'video': float32 [T, H, W, 3] in [-1, 1], 'caption': str, label: int32}.

    Lives in a package module: grain's spawned worker processes unpickle it by import.
    """

    labels: tuple[str, ...]

    def map(self, example: dict[str, Any]) -> dict[str, Any]:
        decoded = {
            "video": example["video"].astype(np.float32) / 127.5 - 1,
            "caption": example["caption"].decode("utf-8"),
        }
        decoded.update({key: np.int32(example[key]) for key in self.labels})
        # Datasets of many sizes store each clip's size (see data/moving_shapes.py).
        decoded.update({key: np.asarray(example[key]).item() for key in SIZE_KEYS if key in example})
        return decoded


class GlobalBatchSampler:
    """This host's rows of every global batch, as the index sampler of a grain DataLoader.

    The invariant: global batch k is positions [k * batch_size, (k + 1) * batch_size) of `order`
    (one order of the whole split, shuffled by its seed), whatever the number of hosts or loader
    workers, and this host's batch k holds `rows` of it in that order. Placed by
    `jax.make_array_from_process_local_data` (which fills a host's rows of the global array in
    increasing order), the hosts' batches assemble exactly the batch one host would have read.

    grain deals the loader's indices to its W workers round robin (worker w reads w, w + W, ...,
    batches them, and batches leave worker by worker), so index i is row `rows[(i // W) % n]` of
    this host's batch `(i // W // n) * W + i % W`.
    """

    def __init__(self, order: grain.samplers.IndexSampler, batch_size: int, rows: Sequence[int],
                 worker_count: int = 0, drop_remainder: bool = True):
        rows = tuple(int(r) for r in rows)
        if not rows or list(rows) != sorted(set(rows)) or not 0 <= rows[0] <= rows[-1] < batch_size:
            raise ValueError(f"rows={rows} must be distinct rows of a global batch of {batch_size}, "
                             "in increasing order.")
        self._order, self._batch_size, self._rows = order, batch_size, rows
        self._workers = max(worker_count, 1)
        total = len(order)
        if total == sys.maxsize:  # repeats forever
            self._length = total
        elif self._workers > 1:
            raise ValueError(f"A finite loader (num_epochs set) reads with worker_count=0 or 1, not "
                             f"{worker_count}: its last batches would not be whole on every worker.")
        else:
            whole, remainder = divmod(total, batch_size)
            partial = 0 if drop_remainder else sum(r < remainder for r in rows)
            self._length = whole * len(rows) + partial

    def __len__(self) -> int:
        return self._length

    def __repr__(self) -> str:  # grain checks a restored iterator state against it
        return (f"GlobalBatchSampler(order={self._order!r}, batch_size={self._batch_size}, "
                f"rows={self._rows}, workers={self._workers})")

    def __getitem__(self, index: int) -> grain.RecordMetadata:
        if not 0 <= index < self._length:
            raise IndexError(f"Index {index} is outside [0, {self._length}).")
        worker, read = index % self._workers, index // self._workers
        batch = (read // len(self._rows)) * self._workers + worker
        position = batch * self._batch_size + self._rows[read % len(self._rows)]
        record = self._order[position]
        return grain.RecordMetadata(index=index, record_key=record.record_key, rng=record.rng)


def host_rows(batch_size: int, shard_options: grain.sharding.ShardOptions) -> range:
    """A host's equal, contiguous share of each global batch: rows [i * b / n, (i + 1) * b / n) of
    host i of n (jax processes by default), as a batch split over a mesh in process order is."""
    index, count = shard_options.shard_index, shard_options.shard_count
    if batch_size % count:
        raise ValueError(f"A global batch of {batch_size} does not split evenly over {count} hosts; "
                         f"make the batch size a multiple of {count}.")
    share = batch_size // count
    return range(index * share, (index + 1) * share)


def make_loader(*, name: str, builder_config: str, data_dir: str | None, split: str,
                batch_size: int, seed: int, shuffle: bool = True, num_epochs: int | None = None,
                worker_count: int = 0, drop_remainder: bool = True,
                rows: Sequence[int] | None = None,
                shard_options: grain.sharding.ShardOptions | None = None,
                latent_cache: str | None = None, collate: str = "stack") -> grain.DataLoader:
    """This host's part of global batches of `batch_size` from `split`, generating the data if
    needed.

    Each host reads `rows` of every global batch (see `GlobalBatchSampler`): by default host
    i of n's contiguous share (`host_rows`), the hosts being jax processes unless shard_options
    says otherwise; the trainer passes the rows its devices hold. One host reads whole batches.

    collate='stack' stacks each batch's arrays; 'list' keeps it a list of examples, for clips of
    many sizes (`data/batching.py` batches those by their token count).

    With latent_cache, batches come from that cache ('latent', 'caption', 'text', 'text_mask' and
    labels) instead of pixels. num_epochs=None repeats forever; a finite loader drops the last,
    partial global batch unless drop_remainder=False.
    """
    if latent_cache:
        source = latent_cache_lib.data_source(latent_cache, split)
        decode = latent_cache_lib.DecodeRecord()
    else:
        builder = prepare(name, builder_config, data_dir)
        source = builder.as_data_source(split)
        decode = DecodeExample(_label_names(builder))
    if collate not in ("stack", "list"):
        raise ValueError(f"collate must be 'stack' or 'list', got {collate!r}.")
    if rows is not None and shard_options is not None:
        raise ValueError("Give rows or shard_options, not both: shard_options only picks the "
                         "default rows.")
    if rows is None:
        rows = host_rows(batch_size, shard_options or grain.sharding.ShardByJaxProcess())
    rows = tuple(rows)
    order = grain.samplers.IndexSampler(num_records=len(source), shuffle=shuffle,
                                        num_epochs=num_epochs, seed=seed)
    sampler = GlobalBatchSampler(order, batch_size, rows, worker_count=worker_count,
                                 drop_remainder=drop_remainder)
    batch = grain.transforms.Batch(len(rows), drop_remainder=drop_remainder,
                                   batch_fn=list if collate == "list" else None)
    return grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=[decode, batch],
        worker_count=worker_count,
        shard_options=grain.sharding.NoSharding(),  # the sampler already reads this host's rows
    )


def eval_prompts(name: str, builder_config: str, data_dir: str | None, split: str,
                 num: int, latent_cache: str | None = None) -> list[dict[str, Any]]:
    """The first `num` examples of `split`, in a fixed order, as prompts: caption, label names and
    the real video (uint8 [T, H, W, 3], a reference for scoring generated ones), e.g.
    {'caption': 'a red square slides left', 'colour': 'red', 'shape': 'square', ..., 'video': ...}.
    """
    del latent_cache  # prompts and reference videos come from the dataset itself
    builder = prepare(name, builder_config, data_dir)
    source = builder.as_data_source(split)
    if num > len(source):
        raise ValueError(f"{name}/{builder_config} {split} has {len(source)} examples, not {num}")
    features = builder.info.features
    prompts = []
    for index in range(num):
        example = source[index]
        prompt = {"caption": example["caption"].decode("utf-8"), "video": example["video"]}
        prompt.update({key: features[key].int2str(example[key]) for key in _label_names(builder)})
        prompts.append(prompt)
    return prompts
