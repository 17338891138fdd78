"""video_folder: a user's own videos and captions, stored at their native sizes and frame rates."""

import json
import logging
import os

import imageio.v2 as imageio
import ml_collections
import numpy as np
import pytest

from sora_jax.data import clip_sizes, pipeline
from sora_jax.data import video_folder as vf

MAX_AREA, MAX_FRAMES, TARGET_FPS = 2048, 9, 8.0
# file: (frames, height, width, fps) of the source, and what the dataset stores of it:
# (frames, height, width, fps, stride).
SOURCES = {
    "landscape.mp4": ((23, 32, 48, 30), (5, 32, 48, 7.5, 4)),  # native size kept, every 4th frame
    "portrait.webm": ((12, 40, 24, 12), (5, 48, 32, 6.0, 2)),  # sides to multiples of 16
    "large.mp4": ((14, 96, 160, 8), (9, 32, 48, 8.0, 1)),  # scaled down, cut to max_frames
    "clips/square.gif": ((7, 40, 40, 10), (5, 32, 32, 10.0, 1)),  # odd frame count, a subfolder
    "still.png": ((1, 20, 36, 0), (1, 16, 32, 0.0, 1)),  # an image
}


def _level(index):
    """The grey level of source frame `index`, so a stored frame tells which source frame it is."""
    return 20 + 8 * index


def _write(path, frames, height, width, fps):
    video = np.stack([np.full((height, width, 3), _level(i), np.uint8) for i in range(frames)])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if path.endswith(".png"):
        imageio.imwrite(path, video[0])
    elif path.endswith(".gif"):
        imageio.mimwrite(path, video, duration=1000 / fps, loop=0)
    else:
        codec = "libvpx-vp9" if path.endswith(".webm") else "libx264"
        imageio.mimwrite(path, video, fps=fps, codec=codec, macro_block_size=1,
                         ffmpeg_log_level="error")


def _write_captions(folder, rows, jsonl=False):
    if jsonl:
        lines = [json.dumps(row) if isinstance(row, dict) else row for row in rows]
        with open(os.path.join(folder, "captions.jsonl"), "w") as f:
            f.write("\n".join(lines) + "\n")
    else:
        with open(os.path.join(folder, "captions.csv"), "w") as f:
            f.write("file,caption\n" + "".join(f"{file},{caption}\n" for file, caption in rows))


def _data(folder, data_dir, **options):
    return ml_collections.ConfigDict(dict(name="video_folder", builder_config="my clips",
                                          folder=str(folder), data_dir=str(data_dir), **options))


def _build(data):
    kw = pipeline.data_kwargs(data)
    return pipeline.prepare(kw["name"], kw["builder_config"], kw["data_dir"])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A folder of 5 good sources, one uncaptioned video, one corrupt file and a caption row for a
    missing file, built once; returns (builder, log messages of the build, tfds data_dir)."""
    folder = tmp_path_factory.mktemp("my_clips")
    for file, ((frames, height, width, fps), _) in SOURCES.items():
        _write(str(folder / file), frames, height, width, fps)
    _write(str(folder / "uncaptioned.mp4"), 5, 16, 16, 8)
    (folder / "broken.mp4").write_bytes(np.random.default_rng(0).bytes(2000))
    _write_captions(folder, [(file, f"a clip called {file}") for file in SOURCES]
                    + [("broken.mp4", "a corrupt file"), ("missing.mp4", "not in the folder")])
    data_dir = tmp_path_factory.mktemp("tfds")
    handler = _Records()
    logging.getLogger("absl").addHandler(handler)
    try:
        builder = _build(_data(folder, data_dir, max_area=MAX_AREA, max_frames=MAX_FRAMES,
                               target_fps=TARGET_FPS))
    finally:
        logging.getLogger("absl").removeHandler(handler)
    return builder, handler.messages, str(data_dir)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _records(builder):
    return {r["file"].decode(): (split, r) for split in builder.info.splits
            for source in [builder.as_data_source(split)] for r in source}


def test_every_readable_captioned_file_becomes_one_example_in_train_or_validation(built):
    builder, _, _ = built
    records = _records(builder)
    assert set(records) == set(SOURCES)
    splits = {split for split, _ in records.values()}
    assert splits == {"train", "validation"}
    for file, (_, record) in records.items():
        assert record["caption"].decode() == f"a clip called {file}"


def test_skipped_files_are_reported_by_name_in_the_log_and_the_metadata(built):
    builder, messages, data_dir = built
    reread = pipeline.get_builder("video_folder", builder.builder_config, data_dir)
    assert reread.is_prepared()
    for skipped in (builder.info.metadata["skipped"], reread.info.metadata["skipped"]):
        assert [entry.split(" ")[0] for entry in skipped["unreadable"]] == ["broken.mp4"]
        assert skipped["missing"] == ["missing.mp4"]
        assert skipped["uncaptioned"] == ["uncaptioned.mp4"]
        assert not skipped["bad_rows"] and not skipped["duplicates"]
    summary = "\n".join(messages)
    for name in ("broken.mp4", "missing.mp4", "uncaptioned.mp4"):
        assert name in summary


def test_stored_clips_obey_the_size_rules_and_keep_their_aspect_ratio(built):
    builder, _, _ = built
    for file, (_, record) in _records(builder).items():
        (_, height, width, _), expected = SOURCES[file]
        video = record["video"]
        frames, h, w = int(record["frames"]), int(record["height"]), int(record["width"])
        assert video.shape == (frames, h, w, 3) and video.dtype == np.uint8, file
        assert (frames, h, w) == expected[:3], file
        clip_sizes.check_clip_size(frames, h, w)
        assert frames <= MAX_FRAMES and h * w <= MAX_AREA, file
        scale = min(1.0, np.sqrt(MAX_AREA / (height * width)))  # keeps the aspect ratio
        assert abs(h - height * scale) < 16 and abs(w - width * scale) < 16, file


def test_fast_sources_keep_every_stride_th_frame_and_record_the_resulting_fps(built):
    builder, _, _ = built
    for file, (_, record) in _records(builder).items():
        _, (frames, _, _, fps, stride) = SOURCES[file]
        assert record["fps"] == pytest.approx(fps), file
        levels = record["video"].reshape(frames, -1).mean(-1)
        np.testing.assert_allclose(levels, [_level(stride * i) for i in range(frames)], atol=3,
                                   err_msg=file)


def test_fit_size_keeps_small_sizes_and_scales_large_ones_down_to_multiples_of_16():
    assert vf.fit_size(32, 48, 2048) == (32, 48)
    assert vf.fit_size(100, 60, 1_000_000) == (112, 64)  # the nearest aspect ratio
    assert vf.fit_size(1080, 1920, 256 * 256) == (192, 336)
    assert vf.fit_size(1920, 1080, 256 * 256) == (336, 192)
    for height, width in ((1080, 1920), (480, 640), (7, 300), (300, 7), (17, 15), (4, 100_000)):
        h, w = vf.fit_size(height, width, 4096)
        assert h % 16 == w % 16 == 0 and 16 <= min(h, w) and h * w <= 4096


def test_the_validation_split_is_a_deterministic_hash_of_the_paths():
    files = [f"clip_{i}.mp4" for i in range(2000)]
    splits = vf.split_files(files, 0.05)
    assert splits == vf.split_files(files[::-1], 0.05)
    assert sorted(splits["train"] + splits["validation"]) == sorted(files)
    assert 0.04 < len(splits["validation"]) / len(files) < 0.06
    assert [len(s) for s in vf.split_files(files[:2], 0.05).values()] == [1, 1]
    assert vf.split_files(files[:3], 0.0) == {"train": files[:3]}


def test_jsonl_captions_with_malformed_and_duplicate_rows(tmp_path):
    folder = tmp_path / "clips"
    _write(str(folder / "a.gif"), 5, 16, 16, 8)
    _write(str(folder / "b.gif"), 5, 16, 32, 8)
    _write_captions(folder, [{"file": "a.gif", "caption": "first"}, "{not json",
                             {"file": "a.gif", "caption": "again"}, {"file": "b.gif"},
                             {"file": "./b.gif", "caption": "second"}], jsonl=True)
    builder = _build(_data(folder, tmp_path / "tfds", validation_fraction=0.0))
    records = _records(builder)
    assert {f: r["caption"].decode() for f, (_, r) in records.items()} == {
        "a.gif": "first", "b.gif": "second"}
    skipped = builder.info.metadata["skipped"]
    assert skipped["bad_rows"] == ["captions.jsonl line 2", "captions.jsonl line 4"]
    assert skipped["duplicates"] == ["captions.jsonl line 3: a.gif"]


def test_changing_the_folder_or_an_option_names_a_new_dataset(tmp_path):
    folder = tmp_path / "clips"
    _write(str(folder / "a.gif"), 5, 16, 16, 8)
    _write_captions(folder, [("a.gif", "a clip")])
    def name(**options):
        return pipeline.data_kwargs(_data(folder, tmp_path, **options))["builder_config"].name

    first = name()
    assert first.startswith("my_clips_") and first == name()
    assert first != name(max_frames=5)
    _write(str(folder / "b.gif"), 5, 16, 16, 8)
    assert first != name()


@pytest.mark.parametrize("layout, error", [
    ("empty", "is empty"),
    ("no_captions", "has no captions file"),
    ("both_captions", "has both captions.csv and captions.jsonl"),
    ("only_missing_files", r"no usable row \(1 missing, 1 uncaptioned\)"),
    ("wrong_columns", r"columns \['path', 'text'\]"),
    ("nothing_decodes", r"could be decoded:\n.*broken\.mp4"),
])
def test_unusable_folders_fail_with_a_clear_error_naming_the_folder_and_the_layout(
        tmp_path, layout, error):
    folder = tmp_path / "clips"
    folder.mkdir()
    if layout != "empty":
        _write(str(folder / "a.gif"), 5, 16, 16, 8)
    if layout == "both_captions":
        _write_captions(folder, [("a.gif", "a clip")])
        _write_captions(folder, [{"file": "a.gif", "caption": "a clip"}], jsonl=True)
    elif layout == "only_missing_files":
        _write_captions(folder, [("missing.mp4", "not here")])
    elif layout == "wrong_columns":
        (folder / "captions.csv").write_text("path,text\na.gif,a clip\n")
    elif layout == "nothing_decodes":
        (folder / "broken.mp4").write_bytes(b"not a video")
        _write_captions(folder, [("broken.mp4", "a corrupt file")])
    with pytest.raises(ValueError, match=error) as info:
        _build(_data(folder, tmp_path / "tfds"))
    assert str(folder) in str(info.value)
    if layout != "nothing_decodes":
        assert "captions.csv" in str(info.value) and "captions.jsonl" in str(info.value)


def test_a_config_without_a_folder_fails_with_a_clear_error(tmp_path):
    data = _data(tmp_path, tmp_path)
    data.folder = ""
    with pytest.raises(ValueError, match="needs config.data.folder"):
        pipeline.data_kwargs(data)
    with pytest.raises(ValueError, match="is not a folder"):
        pipeline.data_kwargs(_data(tmp_path / "nowhere", tmp_path))
