"""video_folder: a tensorflow-datasets builder for your own videos (and images) with captions.

The folder holds the media and one captions file, `file` paths relative to the folder:

    my_clips/
      captions.csv      a header row `file,caption`, then one row per clip, or
      captions.jsonl    one {"file": "walk.mp4", "caption": "a dog walks on a beach"} per line
      walk.mp4  sea.webm  cats/nap.gif  logo.png ...

Select it in an experiment config; `pipeline.data_kwargs` turns the `data` section into a
`VideoFolderConfig` whose name is `builder_config` plus a digest of the folder's listing and the
options, so changing either builds a new dataset instead of reusing a stale one:

    config.data.name = 'video_folder'
    config.data.builder_config = 'my_clips'   # names the dataset under data_dir/video_folder/
    config.data.folder = '/path/to/my_clips'
    # optional, defaults as in VideoFolderConfig:
    config.data.max_area = 256 * 256  config.data.max_frames = 33  config.data.target_fps = 8.0
    config.data.validation_fraction = 0.05

or directly: `tfds.builder('video_folder', config=VideoFolderConfig(name='my_clips',
folder='/path/to/my_clips'), data_dir=d).download_and_prepare()`.

Each clip keeps its aspect ratio and its size up to `max_area` pixels per frame: larger ones are
scaled down; then each side goes to a nearby multiple of 16 (`fit_size`), resizing to cover that
size and cropping the centre. A source faster than `target_fps` keeps every stride-th frame
(stride = round(source fps / target_fps)); clips are cut to `max_frames` and then to 1 + 4k frames
(`clip_sizes`). Images, and videos shorter than 5 frames, become 1-frame clips. Media are decoded
with imageio (ffmpeg through imageio-ffmpeg for videos, Pillow for GIFs and images).

Nothing in the folder crashes the build: unreadable or corrupt files, caption rows naming missing
files, files without a caption, duplicate or malformed rows are skipped; the build logs a summary
naming them, and the dataset's metadata.json keeps it (`builder.info.metadata['skipped']`). An
empty folder, a folder without a captions file, or no usable row is a clear error instead.

Splits: `train` and `validation`, by a hash of each file's path (`validation_fraction`; at least
one clip each when there are two or more).

Stored features: 'video' uint8 [T, H, W, 3] (its own size), 'caption' text, 'frames', 'height',
'width' int32, 'fps' float32 (frames per second after the stride; 0 for still images), and
'file' text (the path in the folder).
"""

import csv
import dataclasses
import hashlib
import json
import math
import os
import re
from collections.abc import Iterator
from typing import Any

import imageio.v2 as imageio
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from PIL import Image

from sora_jax.data.clip_sizes import SPATIAL_MULTIPLE, check_clip_size, trim_frames

CAPTION_FILES = ("captions.csv", "captions.jsonl")
MEDIA_EXTENSIONS = (".mp4", ".webm", ".mov", ".avi", ".mkv", ".m4v", ".mpg", ".mpeg", ".gif",
                    ".png", ".jpg", ".jpeg", ".webp", ".bmp")
LAYOUT = ("expected a folder of videos or images plus captions.csv (a header row `file,caption`) "
          "or captions.jsonl (lines {\"file\": ..., \"caption\": ...}), with `file` relative to "
          "the folder; see sora_jax/data/video_folder.py")
# What each kind of skipped entry in the report means.
SKIP_REASONS = {
    "unreadable": "files that could not be decoded",
    "missing": "caption rows naming files not in the folder",
    "uncaptioned": "media files without a caption row",
    "bad_rows": "caption rows without a file or a caption, or not valid JSON",
    "duplicates": "further caption rows for a file already captioned (the first row is kept)",
}
# The `data` fields that `pipeline.data_kwargs` passes to `VideoFolderConfig.for_folder`.
OPTIONS = ("max_area", "max_frames", "target_fps", "validation_fraction")


@dataclasses.dataclass(eq=False)
class VideoFolderConfig(tfds.core.BuilderConfig):
    """Where the media are and how clips are sized (see the module docstring).

    target_fps None keeps every frame; validation_fraction 0 makes no validation split.
    """

    folder: str = ""
    max_area: int = 256 * 256
    max_frames: int = 33
    target_fps: float | None = 8.0
    validation_fraction: float = 0.05

    def __post_init__(self):
        if not self.folder:
            raise ValueError(f"VideoFolderConfig {self.name!r} needs a folder: {LAYOUT}")
        check_clip_size(self.max_frames, SPATIAL_MULTIPLE, SPATIAL_MULTIPLE)
        if self.max_area < SPATIAL_MULTIPLE**2:
            raise ValueError(f"max_area must be >= {SPATIAL_MULTIPLE**2}; got {self.max_area}")
        if self.target_fps is not None and self.target_fps <= 0:
            raise ValueError(f"target_fps must be positive or None; got {self.target_fps}")
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in [0, 1); got "
                             f"{self.validation_fraction}")

    @classmethod
    def for_folder(cls, folder: str, name: str | None = None, **options) -> "VideoFolderConfig":
        """A config named `name` (default: the folder's name) plus a digest of the folder's
        listing (paths, sizes, modification times) and the options."""
        folder = os.path.abspath(os.path.expanduser(folder))
        _check_is_folder(folder)
        stats = {path: os.stat(os.path.join(folder, path)) for path in _list_files(folder)}
        listing = [(path, st.st_size, st.st_mtime_ns) for path, st in stats.items()]
        digest = hashlib.sha256(json.dumps([folder, listing, sorted(options.items())]).encode())
        label = re.sub(r"[^a-z0-9_]+", "_", (name or os.path.basename(folder)).lower()).strip("_")
        return cls(name=f"{label or 'videos'}_{digest.hexdigest()[:8]}", folder=folder,
                   description=f"Videos and captions from {folder}.", **options)


def fit_size(height: int, width: int, max_area: int) -> tuple[int, int]:
    """The stored (height, width) of frames of (height, width): multiples of 16 within one multiple
    of the size scaled down to max_area pixels (not scaled when smaller), at most max_area pixels,
    with the aspect ratio nearest the source's; of equally near ones, the largest not above it."""
    m = SPATIAL_MULTIPLE
    scale = min(1.0, math.sqrt(max_area / (height * width)))
    target = (height * scale, width * scale)

    def near(x: float) -> tuple[int, int]:
        low = max(m, int(x // m) * m)
        return low, low + m

    options = [(h, w) for h in near(target[0]) for w in near(target[1]) if h * w <= max_area]
    if not options:  # one side under 16 pixels: the other takes the rest of the area
        long = max(m, max_area // m // m * m)
        options = [(m, long) if height <= width else (long, m)]
    aspect = math.log(height / width)
    return min(options, key=lambda hw: (round(abs(math.log(hw[0] / hw[1]) - aspect), 6),
                                        hw[0] > target[0] or hw[1] > target[1], -hw[0] * hw[1]))


def resize_frame(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [h, w, 3] -> [height, width, 3]: scaled (keeping its aspect) to cover that size,
    then its centre cropped."""
    h, w = frame.shape[:2]
    scale = max(height / h, width / w)
    rh, rw = max(height, round(h * scale)), max(width, round(w * scale))
    if (rh, rw) != (h, w):
        frame = np.asarray(Image.fromarray(frame).resize((rw, rh), Image.Resampling.BICUBIC))
    top, left = (rh - height) // 2, (rw - width) // 2
    return frame[top:top + height, left:left + width]


def _rgb(frame: np.ndarray) -> np.ndarray:
    """A decoded frame (grey or colour, with or without alpha) as uint8 [h, w, 3] on black."""
    frame = np.asarray(frame)
    if frame.dtype != np.uint8:
        raise ValueError(f"{frame.dtype} pixels; expected 8-bit")
    if frame.ndim == 2:
        frame = frame[..., None]
    if frame.shape[-1] in (2, 4):  # composite the alpha channel onto black
        alpha = frame[..., -1:].astype(np.float32) / 255
        frame = np.rint(frame[..., :-1] * alpha).astype(np.uint8)
    return np.broadcast_to(frame, (*frame.shape[:2], 3)) if frame.shape[-1] == 1 else frame


def _source_fps(meta: dict[str, Any]) -> float:
    """Frames per second from imageio's metadata: ffmpeg gives 'fps', Pillow a GIF's per-frame
    'duration' in milliseconds; 0 when there is none (still images)."""
    if meta.get("fps"):
        return float(meta["fps"])
    if meta.get("duration"):
        return 1000 / float(meta["duration"])
    return 0.0


def read_clip(path: str, max_area: int, max_frames: int,
              target_fps: float | None) -> tuple[np.ndarray, float]:
    """Decodes `path` into a stored clip, uint8 [T, H, W, 3] with T = 1 + 4k <= max_frames and H,
    W from `fit_size`, and its frames per second after the stride. Raises on unreadable files."""
    with imageio.get_reader(path) as reader:
        source_fps = _source_fps(reader.get_meta_data())
        stride = 1
        if target_fps and source_fps > target_fps:
            stride = max(1, round(source_fps / target_fps))
        frames = []
        for index, frame in enumerate(reader):
            if index % stride == 0:
                frames.append(_rgb(frame))
                if len(frames) == max_frames:
                    break
    if not frames:
        raise ValueError("no frames")
    height, width = fit_size(*frames[0].shape[:2], max_area)
    clip = np.stack([resize_frame(f, height, width) for f in frames[:trim_frames(len(frames))]])
    return clip, source_fps / stride


def _check_is_folder(folder: str) -> None:
    if not os.path.isdir(folder):
        raise ValueError(f"video_folder: {folder!r} is not a folder; {LAYOUT}")


def _list_files(folder: str) -> list[str]:
    """Paths of the files under `folder` relative to it, '/'-separated, hidden ones left out."""
    paths = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        paths += [os.path.relpath(os.path.join(root, f), folder).replace(os.sep, "/")
                  for f in sorted(files) if not f.startswith(".")]
    return paths


def _read_rows(path: str) -> Iterator[tuple[str, Any]]:
    """(where, row) for each row of a captions file; row is a dict, or None when malformed."""
    with open(path, newline="", encoding="utf-8") as f:
        if path.endswith(".csv"):
            reader = csv.DictReader(f)
            if not {"file", "caption"} <= set(reader.fieldnames or ()):
                raise ValueError(f"video_folder: {path!r} has columns {reader.fieldnames}, not "
                                 f"`file,caption`; {LAYOUT}")
            for row in reader:
                yield f"line {reader.line_num}", row
            return
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    row = None
                yield f"line {number}", row if isinstance(row, dict) else None


def scan_folder(folder: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    """The captions of the folder's media, {file: caption}, and what was skipped, by reason
    (`SKIP_REASONS`, 'unreadable' still empty). Raises when nothing usable is there."""
    _check_is_folder(folder)
    files = _list_files(folder)
    if not files:
        raise ValueError(f"video_folder: {folder!r} is empty; {LAYOUT}")
    found = [name for name in CAPTION_FILES if name in files]
    if len(found) != 1:
        problem = "has no captions file" if not found else f"has both {' and '.join(found)}"
        raise ValueError(f"video_folder: {folder!r} {problem}; {LAYOUT}")
    skipped = {reason: [] for reason in SKIP_REASONS}
    captions = {}
    for where, row in _read_rows(os.path.join(folder, found[0])):
        file = str((row or {}).get("file") or "").strip()
        file = os.path.normpath(file).replace(os.sep, "/") if file else file
        caption = str((row or {}).get("caption") or "").strip()
        if not file or not caption:
            skipped["bad_rows"].append(f"{found[0]} {where}")
        elif file in captions:
            skipped["duplicates"].append(f"{found[0]} {where}: {file}")
        elif not os.path.isfile(os.path.join(folder, file)):
            skipped["missing"].append(file)
        else:
            captions[file] = caption
    media = [f for f in files if os.path.splitext(f)[1].lower() in MEDIA_EXTENSIONS]
    skipped["uncaptioned"] = [f for f in media if f not in captions]
    if not captions:
        counts = ", ".join(f"{len(v)} {k}" for k, v in skipped.items() if v) or "no rows"
        raise ValueError(f"video_folder: {found[0]} in {folder!r} has no usable row ({counts}); "
                         f"{LAYOUT}")
    return captions, skipped


def _hash_fraction(file: str) -> float:
    """A fixed number in [0, 1) for each path."""
    return int(hashlib.sha256(file.encode()).hexdigest()[:12], 16) / 16**12


def split_files(files: list[str], validation_fraction: float) -> dict[str, list[str]]:
    """{'train': [...], 'validation': [...]} by the paths' hashes; with validation_fraction > 0 and
    two files or more, neither split is empty. No 'validation' when the fraction is 0."""
    if not validation_fraction:
        return {"train": sorted(files)}
    ranked = sorted(files, key=_hash_fraction)
    num = sum(_hash_fraction(f) < validation_fraction for f in ranked)
    if len(ranked) >= 2:
        num = min(max(num, 1), len(ranked) - 1)
    return {"train": sorted(ranked[num:]), "validation": sorted(ranked[:num])}


def report(skipped: dict[str, Any]) -> str:
    """A readable summary of what a build skipped."""
    lines = [f"{len(entries)} {SKIP_REASONS[reason]}: " + ", ".join(map(str, entries))
             for reason, entries in skipped.items() if entries]
    return "\n".join(lines) or "nothing skipped"


class VideoFolder(tfds.core.GeneratorBasedBuilder):
    """Captioned videos and images from a local folder, at their own sizes."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def __init__(self, *, config: VideoFolderConfig | None = None,
                 file_format: str = "array_record", **kwargs):
        if not isinstance(config, VideoFolderConfig):
            raise ValueError(f"video_folder needs a VideoFolderConfig (or config.data.folder), got "
                             f"{config!r}; {LAYOUT}")
        # array_record: random access for grain, and no TensorFlow needed to write it.
        super().__init__(config=config, file_format=file_format, **kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # As moving_shapes: tfds 4.9.10 cannot find a packaged builder's file on its own.
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        scalar = tfds.features.Scalar
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "video": tfds.features.Tensor(shape=(None, None, None, 3), dtype=np.uint8,
                                              encoding=tfds.features.Encoding.ZLIB),
                "caption": tfds.features.Text(),
                "frames": scalar(np.int32, doc="T, 1 + 4k (1: an image)"),
                "height": scalar(np.int32, doc="H, a multiple of 16"),
                "width": scalar(np.int32, doc="W, a multiple of 16"),
                "fps": scalar(np.float32, doc="frames per second after the stride; 0: an image"),
                "file": tfds.features.Text(doc="path of the source in the folder"),
            }),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # everything is local
        c = self.builder_config
        captions, self._skipped = scan_folder(c.folder)
        self._skipped["unreadable"] = []
        # Decode each file's first frame now, so that splits are assigned over readable files only.
        readable = [f for f in captions if self._read(f, max_frames=1) is not None]
        if not readable:
            raise ValueError(f"video_folder: none of the captioned files in {c.folder!r} could be "
                             f"decoded:\n{report(self._skipped)}")
        self.info.metadata["skipped"] = self._skipped
        return {split: self._generate_examples(files, captions)
                for split, files in split_files(readable, c.validation_fraction).items()}

    def _read(self, file: str, max_frames: int) -> tuple[np.ndarray, float] | None:
        """The clip of `file`, or None (recorded as unreadable) when it cannot be decoded."""
        c = self.builder_config
        try:
            return read_clip(os.path.join(c.folder, file), c.max_area, max_frames, c.target_fps)
        except Exception as e:  # whatever the decoder raises, the file is skipped
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            self._skipped["unreadable"].append(f"{file} ({reason})")
            return None

    def _generate_examples(self, files: list[str], captions: dict[str, str]):
        for file in files:
            clip = self._read(file, self.builder_config.max_frames)
            if clip is None:
                continue
            video, fps = clip
            frames, height, width, _ = video.shape
            yield file, {"video": video, "caption": captions[file], "frames": frames,
                         "height": height, "width": width, "fps": fps, "file": file}

    def _download_and_prepare(self, *args, **kwargs):
        super()._download_and_prepare(*args, **kwargs)
        log = logging.warning if any(self._skipped.values()) else logging.info
        log("video_folder %s from %s: %s", self.builder_config.name, self.builder_config.folder,
            report(self._skipped))
