"""Reads colour, shape, motion direction and coherence from the pixels of a moving_shapes video.

An analytic detector rather than a trained classifier, so prompt-adherence scores of generated
videos (`score`) cannot be gamed by the generator and need no training:

    frame:     background = median colour of the border; foreground = pixels far from it;
               8-connected components; coherent = exactly one object of a dataset-sized shape
    colour:    nearest palette entry to the median colour of the objects' cores
    shape:     best intersection-over-union against square/circle/triangle drawn in the object's
               bounding box, majority vote over coherent frames
    direction: least-squares velocity of the centroid over coherent frames; 'still' when the
               whole clip moves less than half the dataset's slowest speed
"""

import collections
import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from sora_jax.data import moving_shapes

# RGB distance from the background above which a pixel is foreground: every palette colour is
# >= 150 from every background, so antialiased rims count from about half coverage.
FOREGROUND_DISTANCE = 80.0
# Palette entries are >= 150 apart: a colour further than half that from all of them is unknown.
MAX_COLOUR_DISTANCE = 75.0
MIN_OBJECT_FRACTION = 0.95  # of the foreground pixels, held by the one object
MAX_ASPECT = 1.35  # every dataset shape has a square bounding box
MIN_FILL = 0.35  # of the bounding box (a triangle fills 0.5)
STILL_BELOW = moving_shapes.SPEED_RANGE[0] / 2  # clip displacement, fraction of min(h, w)
UNKNOWN = "unknown"


@dataclasses.dataclass(frozen=True)
class Detection:
    """What `detect` read from one video of T frames."""

    colour: str  # a name from moving_shapes.COLOURS, or 'unknown'
    colour_distance: float  # RGB distance of the object's colour to that palette entry
    shape: str  # a name from moving_shapes.SHAPES, or 'unknown' without coherent frames
    direction: str  # from moving_shapes.DIRECTIONS, or 'unknown' with < 2 coherent frames
    coherent: np.ndarray  # bool [T]: exactly one object of a plausible size
    centroids: np.ndarray  # float [T, 2] (x, y) in pixels; NaN in incoherent frames


def label_components(mask: np.ndarray) -> np.ndarray:
    """8-connected components of each frame of `mask` (bool [T, H, W]).

    Returns int64 [T, H, W]: 0 off the mask; on it, one label per component, shared by its pixels.
    """
    none = np.iinfo(np.int64).max
    labels = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), none)
    height, width = mask.shape[1:]
    while True:
        padded = np.pad(labels, ((0, 0), (1, 1), (1, 1)), constant_values=none)
        neighbourhood_min = np.min(
            [padded[:, dy:dy + height, dx:dx + width] for dy in range(3) for dx in range(3)],
            axis=0)
        updated = np.where(mask, neighbourhood_min, none)
        # A label names a pixel of the same component; taking that pixel's label (pointer
        # jumping) shortens long chains, so snake-like noise converges in few iterations.
        updated[mask] = updated.reshape(-1)[updated[mask] - 1]
        if np.array_equal(updated, labels):
            return np.where(mask, labels, 0)
        labels = updated


def _object_area_range(side: int) -> tuple[float, float]:
    """Pixel areas a dataset object can cover, with one pixel of slack around its outline."""
    low, high = moving_shapes.SIZE_RANGE
    return 0.5 * max(low * side - 2, 0) ** 2, (high * side + 2) ** 2  # triangle ... square


def _shape_scores(obj: np.ndarray) -> dict[str, float]:
    """Intersection over union of a cropped object mask [h, w] with each dataset shape."""
    h, w = obj.shape
    u = (np.arange(w) + 0.5) / w * 2 - 1
    v = (np.arange(h) + 0.5) / h * 2 - 1
    scores = {}
    for shape in moving_shapes.SHAPES:
        template = moving_shapes.shape_mask(shape, u[None, :], v[:, None])
        scores[shape] = (template & obj).sum() / (template | obj).sum()
    return scores


def detect(video: np.ndarray) -> Detection:
    """Reads one video, uint8 [T, H, W, 3] (a moving_shapes clip or a generated one)."""
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"expected a uint8 video [T, H, W, 3], got {video.dtype} {video.shape}")
    frames, height, width, _ = video.shape
    pixels = video.astype(np.float32)
    border = np.concatenate([pixels[:, 0], pixels[:, -1], pixels[:, 1:-1, 0], pixels[:, 1:-1, -1]],
                            axis=1)  # [T, perimeter, 3]
    background = np.median(border, axis=1)[:, None, None]  # [T, 1, 1, 3]
    distance = np.linalg.norm(pixels - background, axis=-1)  # [T, H, W]
    foreground = distance > FOREGROUND_DISTANCE
    labels = label_components(foreground)

    area_low, area_high = _object_area_range(min(height, width))
    coherent = np.zeros(frames, bool)
    centroids = np.full((frames, 2), np.nan)
    shape_votes = collections.Counter()
    for t in range(frames):
        ids, counts = np.unique(labels[t][foreground[t]], return_counts=True)
        if not len(ids):
            continue
        area = counts.max()
        ys, xs = np.nonzero(labels[t] == ids[counts.argmax()])
        h, w = np.ptp(ys) + 1, np.ptp(xs) + 1
        if (area >= MIN_OBJECT_FRACTION * counts.sum() and area_low <= area <= area_high
                and max(h, w) <= MAX_ASPECT * min(h, w) and area >= MIN_FILL * h * w):
            coherent[t] = True
            centroids[t] = xs.mean() + 0.5, ys.mean() + 0.5
            crop = labels[t, ys.min():ys.max() + 1, xs.min():xs.max() + 1] == ids[counts.argmax()]
            scores = _shape_scores(crop)
            shape_votes[max(scores, key=scores.get)] += 1

    colour, colour_distance = _colour(pixels[foreground], distance[foreground])
    return Detection(
        colour=colour,
        colour_distance=colour_distance,
        shape=shape_votes.most_common(1)[0][0] if shape_votes else UNKNOWN,
        direction=_direction(centroids, coherent, min(height, width)),
        coherent=coherent,
        centroids=centroids,
    )


def _colour(object_pixels: np.ndarray, distance: np.ndarray) -> tuple[str, float]:
    """Nearest palette colour to the median of the objects' cores (pixels [N, 3], float)."""
    if not len(object_pixels):
        return UNKNOWN, float("inf")
    # The farther half from the background: the core, not the antialiased rim.
    core = object_pixels[distance >= np.median(distance)]
    median = np.median(core, axis=0)
    names = list(moving_shapes.PALETTE)
    gaps = np.linalg.norm(np.asarray([moving_shapes.PALETTE[n] for n in names]) - median, axis=-1)
    best = int(gaps.argmin())
    return (names[best] if gaps[best] <= MAX_COLOUR_DISTANCE else UNKNOWN), float(gaps[best])


def _direction(centroids: np.ndarray, coherent: np.ndarray, side: int) -> str:
    """Direction of the least-squares centroid velocity over coherent frames."""
    if coherent.sum() < 2:
        return UNKNOWN
    t = np.flatnonzero(coherent)
    velocity = np.polyfit(t, centroids[t], 1)[0]  # (vx, vy), pixels per frame
    displacement = velocity * (len(coherent) - 1) / side  # over the clip, fraction of the frame
    if np.linalg.norm(displacement) < STILL_BELOW:
        return "still"
    # Vectors are in image coordinates (y down), like the centroids.
    moving = [d for d in moving_shapes.DIRECTIONS if d != "still"]
    return max(moving, key=lambda d: np.dot(moving_shapes.DIRECTION_VECTORS[d], displacement))


def score(videos: Sequence[np.ndarray], attributes: Sequence[Mapping[str, str]]) -> dict[str, float]:
    """Prompt adherence of videos (each uint8 [T, H, W, 3]) to attribute names, e.g. from
    `pipeline.eval_prompts`: accuracies per attribute, of all three at once, and the fraction of
    all frames that are coherent."""
    if len(videos) != len(attributes):
        raise ValueError(f"{len(videos)} videos but {len(attributes)} attribute sets")
    detections = [detect(np.asarray(v)) for v in videos]

    def accuracy(*keys: str) -> float:
        return float(np.mean([all(getattr(d, k) == a[k] for k in keys)
                              for d, a in zip(detections, attributes)]))

    num_frames = sum(len(d.coherent) for d in detections)
    num_coherent = sum(int(d.coherent.sum()) for d in detections)
    return {
        "colour_accuracy": accuracy("colour"),
        "shape_accuracy": accuracy("shape"),
        "direction_accuracy": accuracy("direction"),
        "joint_accuracy": accuracy("colour", "shape", "direction"),
        "coherent_frame_rate": num_coherent / num_frames,
        "num_videos": len(detections),
        "num_frames": num_frames,
        "num_coherent_frames": num_coherent,
    }
