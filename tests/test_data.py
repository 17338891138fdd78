"""moving_shapes and its input pipeline: determinism, held-out splits, builder, grain loading."""

import hashlib
import itertools
import re

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds

from sora_jax.data import clip_sizes
from sora_jax.data import moving_shapes as ms
from sora_jax.data import pipeline

TINY = dict(frames=5, height=16, width=16)
TRAINING_SPLITS = ("train", "validation")
CONFIGS = ms.MovingShapes.builder_configs
# sha256 of the first 4 examples of every split of f9_s16 (`_examples_hash`), computed before the
# mixed-size configs were added: the fixed-size datasets must rebuild exactly as before.
F9_S16_HASH = "365ec4f172fedfe3f9e9bdc046b5ab54a5340498ab2adb697eaae8e444c3da6c"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    pipeline.prepare("moving_shapes", "tiny", data_dir)
    return data_dir


def _loader(data_dir, **kwargs):
    kwargs = dict(name="moving_shapes", builder_config="tiny", data_dir=data_dir, split="train",
                  batch_size=8, seed=0) | kwargs
    return pipeline.make_loader(**kwargs)


def _examples(split, num, seed=0, size=TINY):
    return [ms.make_example(seed, split, i, **size) for i in range(num)]


def _words(text):
    return set(re.findall(r"[a-z]+", text))


def _phrases(words_by_value, part):
    return [p for words in words_by_value for p in getattr(words, part)]


def _all_phrases(part):
    """Every word sequence `part` ('train' or 'heldout') phrasings can produce."""
    pairs = getattr(ms.VERBS, part) + getattr(ms.STILL_PHRASES, part)
    return (_phrases(ms.COLOUR_WORDS.values(), part) + _phrases(ms.SHAPE_WORDS.values(), part)
            + _phrases(ms.SIZE_WORDS.values(), part) + _phrases(ms.DIRECTION_WORDS.values(), part)
            + [form for pair in pairs for form in pair]
            + list(getattr(ms.BACKGROUND_PHRASES, part)) + list(getattr(ms.TEMPLATES, part))
            + list(getattr(ms.IMAGE_TEMPLATES, part)))


def test_examples_are_deterministic_from_seed_split_and_index():
    a, b = ms.make_example(0, "train", 7, **TINY), ms.make_example(0, "train", 7, **TINY)
    assert a["caption"] == b["caption"] and np.array_equal(a["video"], b["video"])
    for other in (ms.make_example(1, "train", 7, **TINY), ms.make_example(0, "train", 8, **TINY),
                  ms.make_example(0, "validation", 7, **TINY)):
        assert not np.array_equal(a["video"], other["video"])


def test_videos_have_the_requested_size_and_dtype():
    video = ms.make_example(0, "train", 0, frames=9, height=24, width=40)["video"]
    assert video.shape == (9, 24, 40, 3) and video.dtype == np.uint8


def test_clip_lengths_are_one_plus_a_multiple_of_four():
    for config in ms.MovingShapes.BUILDER_CONFIGS:
        for frames in getattr(config, "durations", None) or (config.frames,):
            assert (frames - 1) % 4 == 0, config.name
    with pytest.raises(ValueError, match=r"1 \+ 4k.*5, 9, 13, 17.*got 8"):
        ms.MovingShapesConfig(name="bad", frames=8)


def _examples_hash(split_examples):
    digest = hashlib.sha256()
    for example in split_examples:
        for key in sorted(example):
            value = example[key]
            digest.update(key.encode())
            digest.update(value.encode() if isinstance(value, str) else np.asarray(value).tobytes())
    return digest.hexdigest()


def test_fixed_size_configs_are_unchanged_by_the_mixed_size_ones(tmp_path):
    c = CONFIGS["f9_s16"]
    size = dict(frames=c.frames, height=c.height, width=c.width)
    assert _examples_hash(e for split in ms.SPLITS for e in _examples(split, 4, size=size)) \
        == F9_S16_HASH
    features = ms.MovingShapes(config="f9_s16", data_dir=str(tmp_path)).info.features
    assert features["video"].shape == (9, 16, 16, 3)
    assert not {"frames", "height", "width", "fps"} & set(features)


def _mixed(split, num, config="mixed_s16", seed=0):
    return [ms.make_mixed_example(seed, split, i, CONFIGS[config]) for i in range(num)]


def test_mixed_sizes_vary_and_obey_the_config_limits_and_the_clip_size_rules():
    c = CONFIGS["mixed_s16"]
    examples = _mixed("train", 400)
    sizes = {(e["frames"], e["height"], e["width"]) for e in examples}
    assert {f for f, _, _ in sizes} == {1, *c.durations}
    assert {(h, w) for _, h, w in sizes} == set(c.resolutions) == {(16, 16), (16, 32), (32, 16)}
    for e in examples:
        assert e["video"].shape == (e["frames"], e["height"], e["width"], 3)
        assert e["frames"] <= c.max_frames and e["height"] * e["width"] <= c.max_area
        clip_sizes.check_clip_size(e["frames"], e["height"], e["width"])
        assert e["fps"] == ms.NOMINAL_FPS
    images = sum(e["frames"] == 1 for e in examples) / len(examples)
    assert abs(images - c.image_fraction) < 0.07
    squares = sum(e["height"] == e["width"] for e in examples) / len(examples)
    assert abs(squares - 0.5) < 0.08  # resolution_weights (2, 1, 1)
    # At most ~4x the pixels (so tokens) of the CPU default f9_s16's 9x16x16 clips.
    assert c.max_frames * c.max_area <= 4 * 9 * 16 * 16


def test_images_show_a_still_object_and_their_captions_name_no_motion():
    pairs = ms.VERBS.train + ms.VERBS.heldout + ms.STILL_PHRASES.train + ms.STILL_PHRASES.heldout
    motion = [form for pair in pairs for form in pair] + [
        p for words in ms.DIRECTION_WORDS.values() for p in words.train + words.heldout]
    for split in ms.SPLITS:
        images = [e for e in _mixed(split, 200) if e["frames"] == 1]
        assert images, split
        for e in images:
            assert e["direction"] == "still" and e["speed"] == 0.0
            assert not [p for p in motion if re.search(rf"\b{p}\b", e["caption"])], e["caption"]
            colour_words = ms.COLOUR_WORDS[e["colour"]]
            assert any(w in e["caption"] for w in colour_words.train + colour_words.heldout)
            combo = (e["colour"], e["shape"], e["direction"])
            assert (combo in ms.HELDOUT_COMBOS) == (split == "test"), (split, combo)


def test_mixed_examples_are_deterministic_and_heldout_phrasings_stay_heldout():
    heldout_only = set().union(*map(_words, _all_phrases("heldout"))) - set().union(
        *map(_words, _all_phrases("train")))
    for split, spec in ms.SPLITS.items():
        a, b = _mixed(split, 50), _mixed(split, 50)
        for x, y in zip(a, b):
            assert x["caption"] == y["caption"] and np.array_equal(x["video"], y["video"])
            assert bool(_words(x["caption"]) & heldout_only) == (spec.phrasing == "heldout")
    other = _mixed("train", 50, seed=1)
    assert [e["caption"] for e in other] != [e["caption"] for e in _mixed("train", 50)]


@pytest.mark.parametrize("kwargs, error", [
    (dict(durations=(5, 8)), "got 8"),
    (dict(durations=(5, 21)), "exceeds max_frames"),
    (dict(resolutions=((16, 24),)), "multiples of 16"),
    (dict(resolutions=((32, 32),)), "exceeds max_area"),
    (dict(duration_weights=(1, 2)), "duration_weights"),
    (dict(image_fraction=1.5), "image_fraction"),
])
def test_mixed_configs_reject_sizes_beyond_their_limits(kwargs, error):
    with pytest.raises(ValueError, match=error):
        ms.MixedMovingShapesConfig(name="bad", **kwargs)


def test_mixed_builder_stores_each_example_with_its_own_size(tmp_path):
    builder = pipeline.prepare("moving_shapes", "tiny_mixed", str(tmp_path))
    features = builder.info.features
    assert features["video"].shape == (None, None, None, 3)
    assert [features[k].np_dtype for k in ("frames", "height", "width", "fps")] == [
        np.int32, np.int32, np.int32, np.float32]
    c = builder.builder_config
    for split, num in (("train", c.num_train), ("test", c.num_test)):
        source = builder.as_data_source(split)
        assert len(source) == num
        sizes = set()
        for record in source:
            expected = ms.make_mixed_example(ms.DATASET_SEED, split, record["index"], c)
            np.testing.assert_array_equal(record["video"], expected["video"])
            assert record["caption"].decode() == expected["caption"]
            size = (record["frames"], record["height"], record["width"])
            assert record["video"].shape[:3] == size == (
                expected["frames"], expected["height"], expected["width"])
            sizes.add(size)
        assert len(sizes) >= 4, (split, sizes)
    assert pipeline.clip_shape("moving_shapes", "tiny_mixed", str(tmp_path)) == (
        None, None, None, 3)


def test_the_object_stays_whole_inside_the_frame_in_every_frame():
    rng = np.random.default_rng(0)
    for _ in range(100):
        attrs = ms.sample_attributes(rng, "train")
        video = ms.render_video(attrs, frames=9, height=32, width=48).astype(np.float64)
        background = np.asarray(ms.BACKGROUND_PALETTE[attrs.background], np.float64)
        span = np.asarray(ms.PALETTE[attrs.colour]) - background
        coverage = ((video - background) @ span) / (span @ span)  # [T, H, W]
        fill = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}[attrs.shape]
        np.testing.assert_allclose(coverage.sum((1, 2)), fill * (attrs.size * 32) ** 2, rtol=0.04)


def test_palette_colours_are_far_from_each_other_and_from_every_background():
    colours = np.asarray(list(ms.PALETTE.values()), float)
    backgrounds = np.asarray(list(ms.BACKGROUND_PALETTE.values()), float)
    pairwise = np.linalg.norm(colours[:, None] - colours[None], axis=-1)
    assert pairwise[~np.eye(len(colours), dtype=bool)].min() >= 150
    assert np.linalg.norm(colours[:, None] - backgrounds[None], axis=-1).min() >= 150


def _motion_phrases(direction):
    if direction == "still":
        return [form for pair in ms.STILL_PHRASES.train + ms.STILL_PHRASES.heldout for form in pair]
    return list(ms.DIRECTION_WORDS[direction].train + ms.DIRECTION_WORDS[direction].heldout)


def test_captions_name_the_right_colour_shape_and_direction():
    for split in ms.SPLITS:
        for example in _examples(split, 100):
            caption = example["caption"]
            for attr, vocab in (("colour", ms.COLOUR_WORDS), ("shape", ms.SHAPE_WORDS)):
                named = {value for value, words in vocab.items()
                         if any(re.search(rf"\b{w}\b", caption)
                                for w in words.train + words.heldout)}
                assert named == {example[attr]}, caption
            # "left" is inside "up and to the left": the longest phrase found names the motion.
            found = [(len(p), d) for d in ms.DIRECTIONS for p in _motion_phrases(d)
                     if re.search(rf"\b{p}\b", caption)]
            assert max(found)[1] == example["direction"], caption


def test_heldout_combinations_never_appear_in_training_splits():
    combos = set(itertools.product(ms.COLOURS, ms.SHAPES, ms.DIRECTIONS))
    assert ms.HELDOUT_COMBOS < combos and 0.08 <= len(ms.HELDOUT_COMBOS) / len(combos) <= 0.12
    for i, values in enumerate((ms.COLOURS, ms.SHAPES, ms.DIRECTIONS)):
        assert {c[i] for c in ms.TRAIN_COMBOS} == set(values)  # each value alone is still seen
    rng = np.random.default_rng(0)
    for split in ms.SPLITS:
        seen = {(a.colour, a.shape, a.direction)
                for a in (ms.sample_attributes(rng, split) for _ in range(2000))}
        assert seen <= ms.HELDOUT_COMBOS if split == "test" else not seen & ms.HELDOUT_COMBOS


def test_heldout_phrasings_never_appear_in_training_captions():
    heldout_only = set().union(*map(_words, _all_phrases("heldout"))) - set().union(
        *map(_words, _all_phrases("train")))
    for phrase in _all_phrases("heldout"):  # every held-out phrasing is recognisably new
        assert _words(phrase) & heldout_only, phrase
    for split, spec in ms.SPLITS.items():
        for example in _examples(split, 200):
            new_words = _words(example["caption"]) & heldout_only
            assert bool(new_words) == (spec.phrasing == "heldout"), example["caption"]


def test_make_caption_rejects_an_unknown_phrasing():
    attrs = ms.sample_attributes(np.random.default_rng(0), "train")
    with pytest.raises(ValueError, match="phrasing"):
        ms.make_caption(attrs, np.random.default_rng(0), phrasing="test")


def test_rephrasings_keep_the_attributes_and_change_only_the_wording_they_name():
    training = {ex["caption"] for ex in _examples("train", 2000)}
    for i, (colour, shape, direction) in enumerate(ms.TRAIN_COMBOS[:60]):
        for style in ms.REPHRASINGS:
            caption = ms.rephrase(colour, shape, direction, np.random.default_rng(i), style)
            for words in (ms.COLOUR_WORDS[colour], ms.SHAPE_WORDS[shape]):
                plain = " ".join(re.findall(r"[a-z]+", caption))
                used = [w for w in words.train + words.heldout if f" {w} " in f" {plain} "]
                assert used, (style, caption)  # the attribute is named ...
                # ... with a held-out synonym exactly when that is the point of the style.
                assert set(used) <= set(words.heldout if style == "synonyms" else words.train)
            if style in ("word_order", "long"):
                assert caption not in training, caption
        train = ms.rephrase(colour, shape, direction, np.random.default_rng(i), "train")
        long = ms.rephrase(colour, shape, direction, np.random.default_rng(i), "long")
        assert len(long.split()) >= len(train.split()) + 5, (train, long)
    with pytest.raises(ValueError, match="valid"):
        ms.rephrase("red", "square", "left", np.random.default_rng(0), "shouting")


def test_builder_prepares_and_data_source_reads_back_the_rendered_videos(data_dir):
    builder = pipeline.get_builder("moving_shapes", "tiny", data_dir)
    assert builder.is_prepared()
    config = builder.builder_config
    sizes = {"train": config.num_train, "validation": config.num_validation,
             "test": config.num_test, "test_seen": config.num_test}
    for split, size in sizes.items():
        source = tfds.data_source("moving_shapes/tiny", split=split, data_dir=data_dir)
        assert len(source) == size
        for record in (source[0], source[size - 1]):
            expected = ms.make_example(ms.DATASET_SEED, split, record["index"], **TINY)
            np.testing.assert_array_equal(record["video"], expected["video"])
            assert record["caption"].decode() == expected["caption"]
            assert ms.DIRECTIONS[record["direction"]] == expected["direction"]


def test_loader_batches_have_the_documented_shapes_dtypes_and_range(data_dir):
    batch = next(iter(_loader(data_dir)))
    assert set(batch) == {"video", "caption", "colour", "shape", "direction"}
    assert batch["video"].shape == (8, 5, 16, 16, 3) and batch["video"].dtype == np.float32
    assert -1.0 <= batch["video"].min() < batch["video"].max() <= 1.0
    assert batch["caption"].shape == (8,) and all(isinstance(c, str) for c in batch["caption"])
    for key, names in (("colour", ms.COLOURS), ("shape", ms.SHAPES),
                       ("direction", ms.DIRECTIONS)):
        assert batch[key].dtype == np.int32
        assert 0 <= batch[key].min() <= batch[key].max() < len(names)


def test_two_hosts_read_disjoint_shards_covering_the_split(data_dir):
    shards = []
    for index in range(2):
        options = grain.sharding.ShardOptions(shard_index=index, shard_count=2, drop_remainder=True)
        loader = _loader(data_dir, num_epochs=1, shard_options=options)
        shards.append({v.tobytes() for batch in loader for v in batch["video"]})
    assert len(shards[0]) == len(shards[1]) == 128
    assert not shards[0] & shards[1]


def test_resumed_iterator_yields_the_same_next_batch(data_dir):
    iterator = iter(_loader(data_dir, seed=3))
    next(iterator)
    state = iterator.get_state()
    expected = next(iterator)
    resumed = iter(_loader(data_dir, seed=3))
    resumed.set_state(state)
    actual = next(resumed)
    np.testing.assert_array_equal(actual["video"], expected["video"])
    assert list(actual["caption"]) == list(expected["caption"])


def test_eval_prompts_are_fixed_and_name_heldout_attributes(data_dir):
    prompts = pipeline.eval_prompts("moving_shapes", "tiny", data_dir, "test", 10)
    again = pipeline.eval_prompts("moving_shapes", "tiny", data_dir, "test", 10)
    assert [p["caption"] for p in prompts] == [p["caption"] for p in again]
    for p in prompts:
        assert (p["colour"], p["shape"], p["direction"]) in ms.HELDOUT_COMBOS
        assert p["video"].shape == (5, 16, 16, 3) and p["video"].dtype == np.uint8
    with pytest.raises(ValueError, match="64 examples"):
        pipeline.eval_prompts("moving_shapes", "tiny", data_dir, "test", 65)
