"""moving_shapes: captioned videos of one coloured shape moving over a plain background.

Everything is generated locally: an example is a pure function of (seed, split, index), so the
dataset needs no download and rebuilds bit for bit anywhere.

    attributes = sample_attributes(rng, split)     # colour, shape, direction, size, ...
    video = render_video(attributes, frames, height, width)  # uint8 [frames, height, width, 3]
    caption = make_caption(attributes, rng, phrasing)  # "a small crimson block drifting leftwards"

Fixed-size configs (`MovingShapesConfig`: tiny, f9_s16, ...) store clips of one size. Mixed-size
configs (`MixedMovingShapesConfig`: tiny_mixed, mixed_s16) draw each example's size (frames,
height, width) from a few durations and square, landscape and portrait resolutions; a fraction of
them are images (1 frame, a still object, a caption without motion: "an image of a red square").
Every size obeys `clip_sizes` (1 + 4k frames, sides multiples of 16), and mixed-size examples
store their own `frames`, `height`, `width` and `fps`.

Splits (`SPLITS`), so that evaluation measures generalisation rather than recall:

    train        training (colour, shape, direction) combinations, training phrasings
    validation   the train distribution, other draws (loss per timestep bin)
    test         held-out combinations AND held-out phrasings (compositional generalisation)
    test_seen    training combinations with held-out phrasings (phrasing generalisation alone)

Held-out combinations (`HELDOUT_COMBOS`) are 18 of the 162 triples; every colour, shape and
direction on its own still appears in training. Held-out phrasings use sentence templates that
training never shows and may draw extra synonyms ("scarlet", "ball", "glides", "to the upper
left"), so a model must rely on what its frozen text encoder knows about the words.

The tensorflow-datasets builder `MovingShapes` (registered as `moving_shapes`) writes array_record
files, which `tfds.data_source` and grain read without TensorFlow:

    tfds.builder('moving_shapes/tiny', data_dir=d).download_and_prepare()

Stored features: 'video' uint8 [T, H, W, 3] (fixed or, in mixed-size configs, per example),
'caption' text, the labels 'colour', 'shape', 'direction' (ClassLabels), 'background', 'size',
'speed', 'start_x', 'start_y', 'index', and in mixed-size configs 'frames', 'height', 'width'
(int32) and 'fps' (float32).
"""

import dataclasses
import itertools
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from sora_jax.data.clip_sizes import SPATIAL_MULTIPLE, TEMPORAL_MULTIPLE, check_clip_size

COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan")
# Every pair of object colours is >= 150 apart in RGB, and every object colour >= 150 from every
# background, so a detector can tell them apart even in blurry generated videos.
PALETTE = {
    "red": (230, 30, 30),
    "green": (30, 210, 40),
    "blue": (40, 70, 240),
    "yellow": (240, 220, 40),
    "magenta": (220, 40, 220),
    "cyan": (40, 220, 230),
}
BACKGROUNDS = ("black", "grey", "navy", "brown")
BACKGROUND_PALETTE = {
    "black": (10, 10, 12),
    "grey": (56, 56, 60),
    "navy": (16, 20, 60),
    "brown": (58, 36, 22),
}
SHAPES = ("square", "circle", "triangle")
DIRECTIONS = (
    "still", "left", "right", "up", "down", "up_left", "up_right", "down_left", "down_right"
)
_DIAGONAL = 1 / np.sqrt(2)
# Unit motion vectors in image coordinates: x to the right, y DOWN the frame.
DIRECTION_VECTORS = {
    "still": (0.0, 0.0),
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
    "up_left": (-_DIAGONAL, -_DIAGONAL),
    "up_right": (_DIAGONAL, -_DIAGONAL),
    "down_left": (-_DIAGONAL, _DIAGONAL),
    "down_right": (_DIAGONAL, _DIAGONAL),
}
# Object side (or diameter) and the distance it travels over the whole clip, as fractions of
# min(height, width). Sizes + travel <= 1, so every object fits the frame for the whole clip.
SIZE_RANGE = (0.35, 0.5)
SPEED_RANGE = (0.25, 0.5)
SMALL_BELOW, LARGE_ABOVE = 0.4, 0.45  # sizes a caption may call "small" / "large"

# 18 of 162 (colour, shape, direction) triples, never in train/validation/test_seen: each colour
# with each shape once, each direction twice.
HELDOUT_COMBOS = frozenset({
    ("red", "square", "down"), ("red", "circle", "up_right"), ("red", "triangle", "still"),
    ("green", "square", "up"), ("green", "circle", "down_left"), ("green", "triangle", "left"),
    ("blue", "square", "right"), ("blue", "circle", "still"), ("blue", "triangle", "up_left"),
    ("yellow", "square", "down_right"), ("yellow", "circle", "left"), ("yellow", "triangle", "up"),
    ("magenta", "square", "up_left"), ("magenta", "circle", "right"),
    ("magenta", "triangle", "down_left"),
    ("cyan", "square", "up_right"), ("cyan", "circle", "down"), ("cyan", "triangle", "down_right"),
})
TRAIN_COMBOS = tuple(
    c for c in itertools.product(COLOURS, SHAPES, DIRECTIONS) if c not in HELDOUT_COMBOS
)


class Words(NamedTuple):
    """Phrasings of one thing: `train` ones appear everywhere, `heldout` ones only in evaluation."""

    train: tuple[Any, ...]
    heldout: tuple[Any, ...]


COLOUR_WORDS = {
    "red": Words(("red", "crimson"), ("scarlet",)),
    "green": Words(("green", "emerald"), ("lime",)),
    "blue": Words(("blue", "cobalt"), ("sapphire",)),
    "yellow": Words(("yellow", "golden"), ("lemon",)),
    "magenta": Words(("magenta", "purple"), ("fuchsia",)),
    "cyan": Words(("cyan", "turquoise"), ("aqua",)),
}
SHAPE_WORDS = {
    "square": Words(("square", "block"), ("box",)),
    "circle": Words(("circle", "disc"), ("ball",)),
    "triangle": Words(("triangle", "wedge"), ("triangular tile",)),
}
SIZE_WORDS = {
    "small": Words(("small", "little"), ("tiny",)),
    "large": Words(("large", "big"), ("huge",)),
}
# (finite, participle) forms: "a square slides left" / "a square sliding left".
VERBS = Words(
    (("moves", "moving"), ("slides", "sliding"), ("drifts", "drifting")),
    (("glides", "gliding"), ("travels", "travelling")),
)
STILL_PHRASES = Words(
    (("stays still", "staying still"), ("sits motionless", "sitting motionless"),
     ("does not move", "not moving")),
    (("rests in place", "resting in place"), ("remains stationary", "remaining stationary")),
)
DIRECTION_WORDS = {
    "left": Words(("to the left", "left", "leftwards"), ("towards the left edge",)),
    "right": Words(("to the right", "right", "rightwards"), ("towards the right edge",)),
    "up": Words(("up", "upwards", "towards the top"), ("towards the top edge",)),
    "down": Words(("down", "downwards", "towards the bottom"), ("towards the bottom edge",)),
    "up_left": Words(("up and to the left", "up and left", "towards the top left"),
                     ("to the upper left",)),
    "up_right": Words(("up and to the right", "up and right", "towards the top right"),
                      ("to the upper right",)),
    "down_left": Words(("down and to the left", "down and left", "towards the bottom left"),
                       ("to the lower left",)),
    "down_right": Words(("down and to the right", "down and right", "towards the bottom right"),
                        ("to the lower right",)),
}
BACKGROUND_WORDS = {
    "black": ("black", "dark"),
    "grey": ("grey", "dark grey"),
    "navy": ("navy", "dark"),
    "brown": ("brown", "dark brown"),
}
BACKGROUND_PHRASES = Words((" on a {} background",), (" against a {} backdrop",))
# {a}: article, {desc}: "[size] colour shape", {moves}/{moving}: finite/participle motion, {bg}.
TEMPLATES = Words(
    ("{a} {desc} {moves}{bg}", "{a} {desc} {moving}{bg}", "{desc} {moving}{bg}"),
    ("there is {a} {desc} that {moves}{bg}", "you can see {a} {desc} {moving}{bg}"),
)
# Captions of 1-frame examples, which show no motion.
IMAGE_TEMPLATES = Words(("{a} {desc}{bg}", "an image of {a} {desc}{bg}"),
                        ("there is {a} {desc}{bg}", "a picture of {a} {desc}{bg}"))
SIZE_WORD_PROBABILITY = 0.5
BACKGROUND_MENTION_PROBABILITY = 0.3


class SplitSpec(NamedTuple):
    combos: str  # 'train' | 'heldout'
    phrasing: str  # 'train' | 'heldout'


DATASET_SEED = 0  # the builder's examples are make_example(DATASET_SEED, split, index, ...)
SPLITS = {
    "train": SplitSpec("train", "train"),
    "validation": SplitSpec("train", "train"),
    "test": SplitSpec("heldout", "heldout"),
    "test_seen": SplitSpec("train", "heldout"),
}


@dataclasses.dataclass(frozen=True)
class Attributes:
    """What a video shows. Lengths are fractions of min(height, width), positions of the frame."""

    colour: str
    shape: str
    direction: str
    background: str
    size: float  # side of the square / diameter of the circle / base and height of the triangle
    speed: float  # distance the centre travels over the whole clip
    start_x: float  # centre in the first frame, as a fraction of the width
    start_y: float  # ... and of the height


def sample_attributes(rng: np.random.Generator, split: str, image: bool = False) -> Attributes:
    """Draws attributes from the split's combinations; the object stays inside the frame.
    An image (a 1-frame clip) shows a still object."""
    combos = TRAIN_COMBOS if SPLITS[split].combos == "train" else sorted(HELDOUT_COMBOS)
    if image:
        combos = [c for c in combos if c[2] == "still"]
    colour, shape, direction = combos[rng.integers(len(combos))]
    size = rng.uniform(*SIZE_RANGE)
    speed = 0.0 if direction == "still" else rng.uniform(*SPEED_RANGE)
    # Bounds as if the frame were square: on a wider (or taller) frame the object and its
    # displacement are smaller in that axis's units, so it fits there too.
    start = [
        rng.uniform(size / 2 - min(0.0, d), 1 - size / 2 - max(0.0, d))
        for d in np.multiply(DIRECTION_VECTORS[direction], speed)
    ]
    return Attributes(colour, shape, direction, BACKGROUNDS[rng.integers(len(BACKGROUNDS))],
                      float(size), float(speed), float(start[0]), float(start[1]))


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether points lie inside `shape`, in coordinates where its bounding box is [-1, 1]^2.

    u grows rightwards and v downwards; the triangle points up (apex at v = -1, base at v = 1).
    """
    if shape == "square":
        return (np.abs(u) <= 1) & (np.abs(v) <= 1)
    if shape == "circle":
        return u**2 + v**2 <= 1
    if shape == "triangle":
        return (v <= 1) & (v >= 2 * np.abs(u) - 1)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


_SUPERSAMPLE = 4  # per axis: edges get 16 coverage levels, i.e. light antialiasing


def shape_coverage(shape: str, centre_x: np.ndarray, centre_y: np.ndarray, half: float,
                   height: int, width: int) -> np.ndarray:
    """Fraction of each pixel that `shape` covers, float [T, height, width].

    centre_x, centre_y: [T] centre of the shape's bounding box per frame, in pixels (the frame's
    top-left corner is (0, 0)); half: half the side of that bounding box, in pixels.
    """
    xs = (np.arange(width * _SUPERSAMPLE) + 0.5) / _SUPERSAMPLE  # subpixel centres
    ys = (np.arange(height * _SUPERSAMPLE) + 0.5) / _SUPERSAMPLE
    u = (xs[None, None, :] - np.asarray(centre_x)[:, None, None]) / half
    v = (ys[None, :, None] - np.asarray(centre_y)[:, None, None]) / half
    inside = shape_mask(shape, u, v)
    frames = inside.shape[0]
    return inside.reshape(frames, height, _SUPERSAMPLE, width, _SUPERSAMPLE).mean((2, 4))


def render_video(attrs: Attributes, frames: int, height: int, width: int) -> np.ndarray:
    """Renders the clip as uint8 [frames, height, width, 3]; a 1-frame clip is the first frame."""
    side = min(height, width)
    progress = np.arange(frames) / max(frames - 1, 1)
    dx, dy = np.multiply(DIRECTION_VECTORS[attrs.direction], attrs.speed * side)
    coverage = shape_coverage(attrs.shape, attrs.start_x * width + dx * progress,
                              attrs.start_y * height + dy * progress, attrs.size * side / 2,
                              height, width)
    background = np.asarray(BACKGROUND_PALETTE[attrs.background], np.float32)
    colour = np.asarray(PALETTE[attrs.colour], np.float32)
    video = background + coverage[..., None] * (colour - background)
    return np.rint(video).astype(np.uint8)


def make_caption(attrs: Attributes, rng: np.random.Generator, phrasing: str = "train",
                 image: bool = False) -> str:
    """A sentence describing `attrs`. 'heldout' phrasing uses an evaluation-only template and draws
    synonyms from the training and held-out words together, so every word keeps its meaning.
    The caption of an image (a 1-frame clip) names no motion: "an image of a red square"."""
    if phrasing not in ("train", "heldout"):
        raise ValueError(f"phrasing must be 'train' or 'heldout', got {phrasing!r}")

    def pick(words: Words) -> Any:
        options = words.train if phrasing == "train" else words.train + words.heldout
        return options[rng.integers(len(options))]

    size_class = ("small" if attrs.size < SMALL_BELOW else
                  "large" if attrs.size > LARGE_ABOVE else None)
    size_word = ""
    if size_class and rng.random() < SIZE_WORD_PROBABILITY:
        size_word = pick(SIZE_WORDS[size_class])
    desc = " ".join(w for w in (size_word, pick(COLOUR_WORDS[attrs.colour]),
                                pick(SHAPE_WORDS[attrs.shape])) if w)
    if image:
        moves = moving = ""
    elif attrs.direction == "still":
        moves, moving = pick(STILL_PHRASES)
    else:
        (verb, participle), where = pick(VERBS), pick(DIRECTION_WORDS[attrs.direction])
        moves, moving = f"{verb} {where}", f"{participle} {where}"
    bg = ""
    if rng.random() < BACKGROUND_MENTION_PROBABILITY:
        bg_words = BACKGROUND_WORDS[attrs.background]
        bg = pick(BACKGROUND_PHRASES).format(bg_words[rng.integers(len(bg_words))])
    templates = IMAGE_TEMPLATES if image else TEMPLATES
    template = templates.train if phrasing == "train" else templates.heldout
    article = "an" if desc[0] in "aeiou" else "a"
    return template[rng.integers(len(template))].format(
        a=article, desc=desc, moves=moves, moving=moving, bg=bg)


# Evaluation-only rewordings of a prompt's attributes, to measure how prompt adherence depends on
# the wording alone (`rephrase`). None of them is ever a training caption:
#   train       training templates and words (the reference)
#   synonyms    training templates; every word with a held-out synonym uses it
#   word_order  training words in sentence orders training never shows
#   long        training words inside a longer descriptive sentence
REPHRASINGS = ("train", "synonyms", "word_order", "long")
WORD_ORDER_TEMPLATES = ("{moving}, {a} {desc}", "{a} {shape} in {colour}, {moving}")
LONG_TEMPLATES = (
    "in this short clip {a} {desc} {moves} and nothing else in the frame changes",
    "the video shows a single {desc} that {moves}, from the first frame to the last",
)


def rephrase(colour: str, shape: str, direction: str, rng: np.random.Generator,
             style: str) -> str:
    """A prompt for (colour, shape, direction) worded in `style`, one of `REPHRASINGS`."""
    if style not in REPHRASINGS:
        raise ValueError(f"Unknown rephrasing {style!r}; valid: {list(REPHRASINGS)}.")

    def pick(words: Words) -> Any:
        options = words.heldout if style == "synonyms" else words.train
        return options[rng.integers(len(options))]

    colour_word, shape_word = pick(COLOUR_WORDS[colour]), pick(SHAPE_WORDS[shape])
    if direction == "still":
        moves, moving = pick(STILL_PHRASES)
    else:
        (verb, participle), where = pick(VERBS), pick(DIRECTION_WORDS[direction])
        moves, moving = f"{verb} {where}", f"{participle} {where}"
    templates = {"train": TEMPLATES.train, "synonyms": TEMPLATES.train,
                 "word_order": WORD_ORDER_TEMPLATES, "long": LONG_TEMPLATES}[style]
    desc = f"{colour_word} {shape_word}"
    return templates[rng.integers(len(templates))].format(
        a="an" if desc[0] in "aeiou" else "a", desc=desc, colour=colour_word, shape=shape_word,
        moves=moves, moving=moving, bg="")

def make_example(seed: int, split: str, index: int, frames: int, height: int,
                 width: int) -> dict[str, Any]:
    """Example `index` of `split` as the builder stores it; video: uint8 [frames, height, width, 3]
    and the attributes by name (background by index). With frames=1, an image: a still object and
    a caption without motion."""
    rng = np.random.default_rng((seed, list(SPLITS).index(split), index))
    return _render_example(rng, split, index, frames, height, width)


def _render_example(rng: np.random.Generator, split: str, index: int, frames: int, height: int,
                    width: int) -> dict[str, Any]:
    attrs = sample_attributes(rng, split, image=frames == 1)
    return {
        "video": render_video(attrs, frames, height, width),
        "caption": make_caption(attrs, rng, SPLITS[split].phrasing, image=frames == 1),
        "colour": attrs.colour,
        "shape": attrs.shape,
        "direction": attrs.direction,
        "background": BACKGROUNDS.index(attrs.background),
        "size": attrs.size,
        "speed": attrs.speed,
        "start_x": attrs.start_x,
        "start_y": attrs.start_y,
        "index": index,
    }


def generate_examples(seed: int, split: str, num: int, frames: int, height: int,
                      width: int) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yields (index, example) for the first `num` examples of `split`."""
    for index in range(num):
        yield index, make_example(seed, split, index, frames, height, width)


def check_frames(frames: int) -> None:
    """Raises unless frames = 1 + 4k with k >= 1 (a moving clip the causal VAE tiles)."""
    if frames < 1 + TEMPORAL_MULTIPLE or (frames - 1) % TEMPORAL_MULTIPLE:
        valid = ", ".join(str(1 + TEMPORAL_MULTIPLE * k) for k in range(1, 5))
        raise ValueError(f"frames must be 1 + {TEMPORAL_MULTIPLE}k with k >= 1 ({valid}, ...); "
                         f"got {frames}")


@dataclasses.dataclass(eq=False)
class MovingShapesConfig(tfds.core.BuilderConfig):
    """Clip size and split sizes; `num_test` examples go to each of test and test_seen."""

    frames: int = 9
    height: int = 32
    width: int = 32
    num_train: int = 10_000
    num_validation: int = 500
    num_test: int = 500

    def __post_init__(self):
        check_frames(self.frames)
        check_clip_size(self.frames, self.height, self.width)


def _probabilities(weights: tuple[float, ...] | None, num: int, name: str) -> np.ndarray:
    """Relative weights (None: uniform) as probabilities over `num` choices."""
    p = np.ones(num) if weights is None else np.asarray(weights, np.float64)
    if p.shape != (num,) or (p < 0).any() or p.sum() <= 0:
        raise ValueError(f"{name} must be {num} non-negative weights, not all 0; got {weights}")
    return p / p.sum()


# Playback rate of every clip (moving_shapes has no real time; video_io writes at 8 fps too).
NOMINAL_FPS = 8.0


@dataclasses.dataclass(eq=False)
class MixedMovingShapesConfig(tfds.core.BuilderConfig):
    """Each example draws its own size: an image (1 frame) with probability `image_fraction`, else
    a video of one of `durations` frames; and, independently, one of `resolutions` (height, width).
    Weights are relative probabilities (None: uniform). No clip exceeds `max_frames` frames or
    `max_area` pixels per frame. `num_test` examples go to each of test and test_seen."""

    resolutions: tuple[tuple[int, int], ...] = ((16, 16), (16, 32), (32, 16))
    resolution_weights: tuple[float, ...] | None = None
    durations: tuple[int, ...] = (5, 9, 13, 17)
    duration_weights: tuple[float, ...] | None = None
    image_fraction: float = 0.25
    max_area: int = 512
    max_frames: int = 17
    num_train: int = 10_000
    num_validation: int = 500
    num_test: int = 500

    def __post_init__(self):
        check_clip_size(self.max_frames, SPATIAL_MULTIPLE, SPATIAL_MULTIPLE)
        for frames in self.durations:
            check_frames(frames)
            if frames > self.max_frames:
                raise ValueError(f"duration {frames} exceeds max_frames={self.max_frames}")
        for height, width in self.resolutions:
            check_clip_size(1, height, width)
            if height * width > self.max_area:
                raise ValueError(f"resolution {height}x{width} exceeds max_area={self.max_area}")
        _probabilities(self.duration_weights, len(self.durations), "duration_weights")
        _probabilities(self.resolution_weights, len(self.resolutions), "resolution_weights")
        if not 0 <= self.image_fraction <= 1:
            raise ValueError(f"image_fraction must be in [0, 1]; got {self.image_fraction}")

    def sample_size(self, rng: np.random.Generator) -> tuple[int, int, int]:
        """(frames, height, width) of one example."""
        frames = 1
        if rng.random() >= self.image_fraction:
            p = _probabilities(self.duration_weights, len(self.durations), "duration_weights")
            frames = self.durations[rng.choice(len(self.durations), p=p)]
        p = _probabilities(self.resolution_weights, len(self.resolutions), "resolution_weights")
        height, width = self.resolutions[rng.choice(len(self.resolutions), p=p)]
        return frames, height, width


def make_mixed_example(seed: int, split: str, index: int,
                       config: MixedMovingShapesConfig) -> dict[str, Any]:
    """Example `index` of `split` in a mixed-size config: as `make_example`, at the size that
    `config.sample_size` draws, plus that size and NOMINAL_FPS ('frames', 'height', 'width', 'fps').
    """
    rng = np.random.default_rng((seed, list(SPLITS).index(split), index))
    frames, height, width = config.sample_size(rng)
    example = _render_example(rng, split, index, frames, height, width)
    return example | {"frames": frames, "height": height, "width": width, "fps": NOMINAL_FPS}


class MovingShapes(tfds.core.GeneratorBasedBuilder):
    """Captioned videos of one coloured shape moving on a plain background, generated locally."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        MovingShapesConfig(name="tiny", description="5 frames of 16x16, for tests.",
                           frames=5, height=16, width=16,
                           num_train=256, num_validation=64, num_test=64),
        MovingShapesConfig(name="f9_s16", description="9 frames of 16x16, the CPU default.",
                           frames=9, height=16, width=16),
        MovingShapesConfig(name="f17_s16", description="17 frames of 16x16: room for long "
                           "transitions (loops, connections).", frames=17, height=16, width=16),
        MovingShapesConfig(name="f9_s32", description="9 frames of 32x32.",
                           frames=9, height=32, width=32),
        MovingShapesConfig(name="f17_s64", description="17 frames of 64x64.",
                           frames=17, height=64, width=64,
                           num_train=50_000, num_validation=1_000, num_test=1_000),
        MixedMovingShapesConfig(name="tiny_mixed", description="5 or 9 frames, or images (a "
                                "quarter), of 16x16, 16x32 or 32x16; for tests.",
                                durations=(5, 9), max_frames=9,
                                num_train=64, num_validation=16, num_test=16),
        MixedMovingShapesConfig(name="mixed_s16", description="16x16 (half), 16x32 or 32x16; 5, "
                                "9, 13 or 17 frames, or images (a quarter); at most 3.8x the "
                                "pixels of f9_s16's clips.", resolution_weights=(2, 1, 1)),
    ]
    DEFAULT_CONFIG_NAME = "f9_s16"

    def __init__(self, *, file_format: str = "array_record", **kwargs):
        # array_record by default: random access for grain, and no TensorFlow needed to write it.
        super().__init__(file_format=file_format, **kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # tfds 4.9.10 finds a packaged builder's file through `importlib_resources`, which it does
        # not declare on Python >= 3.9 (tensorflow/datasets#11212); this file is the answer.
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        mixed = isinstance(c, MixedMovingShapesConfig)
        scalar = tfds.features.Scalar
        sizes = {
            "frames": scalar(np.int32, doc="T, 1 + 4k (1: an image)"),
            "height": scalar(np.int32, doc="H, a multiple of 16"),
            "width": scalar(np.int32, doc="W, a multiple of 16"),
            "fps": scalar(np.float32, doc="nominal frames per second"),
        } if mixed else {}
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                # array_record compresses records anyway; zlib-encoding the flat frames first
                # (~30x smaller) makes writing ~2.5x and reading ~2x faster.
                "video": tfds.features.Tensor(
                    shape=(None, None, None, 3) if mixed else (c.frames, c.height, c.width, 3),
                    dtype=np.uint8, encoding=tfds.features.Encoding.ZLIB),
                "caption": tfds.features.Text(),
                "colour": tfds.features.ClassLabel(names=COLOURS),
                "shape": tfds.features.ClassLabel(names=SHAPES),
                "direction": tfds.features.ClassLabel(names=DIRECTIONS),
                "background": scalar(np.int64, doc=f"index into {BACKGROUNDS}"),
                "size": scalar(np.float32, doc="object size, fraction of min(height, width)"),
                "speed": scalar(np.float32, doc="travel over the clip, fraction of min(h, w)"),
                "start_x": scalar(np.float32, doc="first-frame centre, fraction of width"),
                "start_y": scalar(np.float32, doc="first-frame centre, fraction of height"),
                "index": scalar(np.int64, doc="example index in its split (regenerates it)"),
                **sizes,
            }),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # everything is generated locally
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str):
        c = self.builder_config
        num = {"train": c.num_train, "validation": c.num_validation}.get(split, c.num_test)
        if isinstance(c, MixedMovingShapesConfig):
            return ((i, make_mixed_example(DATASET_SEED, split, i, c)) for i in range(num))
        return generate_examples(DATASET_SEED, split, num, c.frames, c.height, c.width)
