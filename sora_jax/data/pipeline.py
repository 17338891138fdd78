"""Input pipeline: tensorflow-datasets builders, written as array_record and read with grain.

    loader = make_loader(name='moving_shapes', builder_config='f9_s32', data_dir=None,
                         split='train', batch_size=32, seed=0)
    batch = next(iter(loader))   # {'video': float32 [32, 9, 32, 32, 3] in [-1, 1],
                                 #  'caption': str [32], 'colour': int32 [32], ...}

Any tfds builder whose examples have a uint8 'video' [T, H, W, 3] and a Text 'caption' works; its
ClassLabel features become int32 labels in the batch. Each host reads a disjoint 1/process_count
of the records, so batch sizes here are per host. The loader's iterator has `get_state()` /
`set_state()`, which the training checkpoint stores so a resumed run sees the same next batch.
"""

import dataclasses
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


def make_loader(*, name: str, builder_config: str, data_dir: str | None, split: str,
                batch_size: int, seed: int, shuffle: bool = True, num_epochs: int | None = None,
                worker_count: int = 0, drop_remainder: bool = True,
                shard_options: grain.sharding.ShardOptions | None = None,
                latent_cache: str | None = None, collate: str = "stack") -> grain.DataLoader:
    """Batches of `split` for this host (batch_size per host), generating the data if needed.

    collate='stack' stacks each batch's arrays; 'list' keeps it a list of examples, for clips of
    many sizes (`data/batching.py` batches those by their token count).

    With latent_cache, batches come from that cache ('latent', 'caption', 'text', 'text_mask' and
    labels) instead of pixels. num_epochs=None repeats forever. shard_options defaults to one
    shard per JAX process, equal in size on every host so all hosts take the same number of steps.
    """
    if latent_cache:
        source = latent_cache_lib.data_source(latent_cache, split)
        decode = latent_cache_lib.DecodeRecord()
    else:
        builder = prepare(name, builder_config, data_dir)
        source = builder.as_data_source(split)
        decode = DecodeExample(_label_names(builder))
    sampler = grain.samplers.IndexSampler(
        num_records=len(source),
        shard_options=shard_options or grain.sharding.ShardByJaxProcess(drop_remainder=True),
        shuffle=shuffle,
        num_epochs=num_epochs,
        seed=seed,
    )
    if collate not in ("stack", "list"):
        raise ValueError(f"collate must be 'stack' or 'list', got {collate!r}.")
    batch = grain.transforms.Batch(batch_size, drop_remainder=drop_remainder,
                                   batch_fn=list if collate == "list" else None)
    return grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=[decode, batch],
        worker_count=worker_count,
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
