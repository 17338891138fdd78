"""The analytic detector: near-perfect on real moving_shapes videos, strict about coherence."""

import numpy as np
import pytest

from sora_jax.data import moving_shapes as ms
from sora_jax.eval import detector

CONFIGS = {c.name: c for c in ms.MovingShapes.BUILDER_CONFIGS}


def _still(colour="red", shape="square", size=0.4, x=0.5, y=0.5, background="black"):
    return ms.Attributes(colour, shape, "still", background, size, 0.0, x, y)


def _opposite(direction):
    flipped = tuple(-np.asarray(ms.DIRECTION_VECTORS[direction]))
    return next(d for d, v in ms.DIRECTION_VECTORS.items() if np.allclose(v, flipped))


@pytest.mark.parametrize("config", ["tiny", "f9_s32"])
def test_reads_real_videos_of_every_split_near_perfectly(config):
    c = CONFIGS[config]
    for split in ms.SPLITS:
        examples = [ms.make_example(1, split, i, c.frames, c.height, c.width) for i in range(100)]
        result = detector.score([e["video"] for e in examples], examples)
        assert result["num_videos"] == 100 and result["num_frames"] == 100 * c.frames
        for key in ("colour_accuracy", "shape_accuracy", "direction_accuracy",
                    "coherent_frame_rate"):
            assert result[key] >= 0.98, (config, split, result)


def test_reads_mixed_size_clips_and_images_near_perfectly():
    c = CONFIGS["mixed_s16"]
    examples = [ms.make_mixed_example(1, "train", i, c) for i in range(150)]
    assert {e["height"] != e["width"] for e in examples} == {True, False}
    for subset in ([e for e in examples if e["frames"] == 1], examples):  # images, then all
        result = detector.score([e["video"] for e in subset], subset)
        for key in ("colour_accuracy", "shape_accuracy", "direction_accuracy",
                    "coherent_frame_rate"):
            assert result[key] >= 0.98, result


def test_pure_noise_has_no_coherent_frame():
    noise = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    detection = detector.detect(noise)
    assert not detection.coherent.any()
    assert detection.shape == detection.direction == detector.UNKNOWN


def test_an_empty_background_has_no_coherent_frame():
    empty = np.broadcast_to(np.uint8(ms.BACKGROUND_PALETTE["navy"]), (5, 32, 32, 3))
    detection = detector.detect(np.ascontiguousarray(empty))
    assert not detection.coherent.any() and detection.colour == detector.UNKNOWN


def test_two_objects_are_not_coherent():
    first = ms.render_video(_still("red", size=0.35, x=0.25, y=0.25), 5, 32, 32)
    second = ms.render_video(_still("blue", "circle", size=0.35, x=0.75, y=0.75), 5, 32, 32)
    background = np.uint8(ms.BACKGROUND_PALETTE["black"])
    both = np.where((second != background).any(-1, keepdims=True), second, first)
    assert not detector.detect(both).coherent.any()


def test_a_fragmented_object_is_not_coherent():
    video = ms.render_video(_still(size=0.5), 5, 32, 32)
    video[:, :, 15:17] = ms.BACKGROUND_PALETTE["black"]  # a gap through the middle
    assert not detector.detect(video).coherent.any()


def test_a_colour_far_from_every_palette_entry_is_unknown():
    video = ms.render_video(_still("red"), 5, 32, 32)
    red = (video == np.uint8(ms.PALETTE["red"])).all(-1)
    video[red] = (150, 120, 100)  # beige: far from the background and from every palette colour
    detection = detector.detect(video)
    assert detection.colour == detector.UNKNOWN and detection.colour_distance > 75


@pytest.mark.parametrize("direction", [d for d in ms.DIRECTIONS if d != "still"])
def test_reversing_a_video_in_time_flips_the_direction(direction):
    attrs = ms.Attributes("green", "triangle", direction, "grey", 0.4, 0.4,
                          0.5 - 0.2 * ms.DIRECTION_VECTORS[direction][0],
                          0.5 - 0.2 * ms.DIRECTION_VECTORS[direction][1])
    video = ms.render_video(attrs, 9, 32, 32)
    assert detector.detect(video).direction == direction
    assert detector.detect(video[::-1]).direction == _opposite(direction)


def test_components_are_8_connected():
    mask = np.zeros((1, 5, 5), bool)
    mask[0, 0, 0] = mask[0, 1, 1] = True  # touching diagonally: one component
    mask[0, 3:, 3:] = True  # separate: another
    labels = detector.label_components(mask)
    assert labels[0, 0, 0] == labels[0, 1, 1] != labels[0, 4, 4]
    assert len(np.unique(labels[mask])) == 2 and (labels[~mask] == 0).all()


def test_rejects_videos_that_are_not_uint8_rgb():
    with pytest.raises(ValueError, match="uint8"):
        detector.detect(np.zeros((5, 16, 16, 3), np.float32))
    with pytest.raises(ValueError, match="2 videos but 1"):
        detector.score([np.zeros((5, 16, 16, 3), np.uint8)] * 2, [{}])
