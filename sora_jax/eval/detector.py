"""Reads colour, shape, motion direction and coherence from the pixels of a moving_shapes video.

An analytic detector rather than a trained classifier, so prompt-adherence scores of generated
videos (`score`) cannot be gamed by the generator and need no training:

    frame:     background = median colour of the border; foreground = pixels far from it, in
               8-connected components; each pixel's coverage = where its colour lies between the
               background and the object's colour (antialiased edges count fractionally)
    shape:     each dataset shape, placed at the object's centroid with the object's area, is
               compared with the coverage (intersection over union); the best one wins the frame
    coherent:  one component holds almost all the foreground, its area is a dataset object's, and
               its best shape explains it (a noisy blob, two fragments or no object do not count)
    colour:    nearest palette entry to the median colour of the objects' cores
    direction: least-squares velocity of the centroid over coherent frames; 'still' when the
               whole clip moves less than half the dataset's slowest speed, and for a coherent
               image (a 1-frame clip)
"""

import collections
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from sora_jax.data import moving_shapes

# RGB distance from the background above which a pixel is foreground: every palette colour is
# >= 150 from every background, so antialiased rims count from about half coverage.
FOREGROUND_DISTANCE = 80.0
# Palette entries are >= 150 apart: a colour further than half that from all of them is unknown.
MAX_COLOUR_DISTANCE = 75.0
MIN_OBJECT_FRACTION = 0.95  # of the foreground pixels, held by the one object
MIN_SHAPE_IOU = 0.75  # dataset objects score >= 0.98 even at 16x16; leaves room for blur
STILL_BELOW = moving_shapes.SPEED_RANGE[0] / 2  # clip displacement, fraction of min(h, w)
UNKNOWN = "unknown"


def _unit_geometry(shape: str) -> tuple[float, float]:
    """(area, centroid's v) of `shape` in its [-1, 1]^2 bounding box, as fractions of the box."""
    u, v = np.meshgrid(np.linspace(-1, 1, 512), np.linspace(-1, 1, 512))
    inside = moving_shapes.shape_mask(shape, u, v)
    return float(inside.mean()), float(v[inside].mean())


_GEOMETRY = {shape: _unit_geometry(shape) for shape in moving_shapes.SHAPES}


@dataclasses.dataclass(frozen=True)
class Detection:
    """What `detect` read from one video of T frames."""

    colour: str  # a name from moving_shapes.COLOURS, or 'unknown'
    colour_distance: float  # RGB distance of the object's colour to that palette entry
    shape: str  # a name from moving_shapes.SHAPES, or 'unknown' without coherent frames
    direction: str  # from moving_shapes.DIRECTIONS, or 'unknown' with < 2 coherent frames
    coherent: np.ndarray  # bool [T]: exactly one object of a plausible size and shape
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
    return (_GEOMETRY["triangle"][0] * max(low * side - 2, 0) ** 2,
            _GEOMETRY["square"][0] * (high * side + 2) ** 2)


def _fit_shapes(coverage: np.ndarray) -> tuple[dict[str, float], np.ndarray]:
    """Intersection over union of an object's coverage [h, w] with each dataset shape of the same
    centroid and area; returns the scores and the centroid (x, y) in pixels of the crop."""
    h, w = coverage.shape
    area = coverage.sum()
    centroid = np.array([(coverage.sum(0) * (np.arange(w) + 0.5)).sum(),
                         (coverage.sum(1) * (np.arange(h) + 0.5)).sum()]) / area
    scores = {}
    for shape, (fill, centroid_v) in _GEOMETRY.items():
        half = np.sqrt(area / fill) / 2
        # A triangle's centroid lies below its box centre (by a third of `half`).
        box_centre_y = centroid[1:] - centroid_v * half
        template = moving_shapes.shape_coverage(shape, centroid[:1], box_centre_y, half, h, w)[0]
        scores[shape] = np.minimum(template, coverage).sum() / np.maximum(template, coverage).sum()
    return scores, centroid


def detect(video: np.ndarray) -> Detection:
    """Reads one video, uint8 [T, H, W, 3] (a moving_shapes clip or a generated one)."""
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"expected a uint8 video [T, H, W, 3], got {video.dtype} {video.shape}")
    frames, height, width, _ = video.shape
    pixels = video.astype(np.float32)
    border = np.concatenate([pixels[:, 0], pixels[:, -1], pixels[:, 1:-1, 0], pixels[:, 1:-1, -1]],
                            axis=1)  # [T, perimeter, 3]
    background = np.median(border, axis=1)[:, None, None]  # [T, 1, 1, 3]
    offset = pixels - background
    distance = np.linalg.norm(offset, axis=-1)  # [T, H, W]
    foreground = distance > FOREGROUND_DISTANCE
    labels = label_components(foreground)
    colour, colour_distance, object_rgb = _colour(pixels[foreground], distance[foreground])
    # Where each pixel lies on the line from the background to the object's colour.
    span = object_rgb - background
    coverage = np.clip((offset * span).sum(-1) / np.maximum((span**2).sum(-1), 1), 0, 1)

    area_low, area_high = _object_area_range(min(height, width))
    coherent = np.zeros(frames, bool)
    centroids = np.full((frames, 2), np.nan)
    shape_votes = collections.Counter()
    for t in range(frames):
        ids, counts = np.unique(labels[t][foreground[t]], return_counts=True)
        if not len(ids) or counts.max() < MIN_OBJECT_FRACTION * counts.sum():
            continue
        ys, xs = np.nonzero(labels[t] == ids[counts.argmax()])
        # The object's box with a margin for its faint antialiased rim.
        y0, x0 = max(ys.min() - 2, 0), max(xs.min() - 2, 0)
        crop = coverage[t, y0:ys.max() + 3, x0:xs.max() + 3]
        if not area_low <= crop.sum() <= area_high:
            continue
        scores, centroid = _fit_shapes(crop)
        best = max(scores, key=scores.get)
        if scores[best] >= MIN_SHAPE_IOU:
            coherent[t] = True
            centroids[t] = centroid + (x0, y0)
            shape_votes[best] += 1

    return Detection(
        colour=colour,
        colour_distance=colour_distance,
        shape=shape_votes.most_common(1)[0][0] if shape_votes else UNKNOWN,
        direction=_direction(centroids, coherent, min(height, width)),
        coherent=coherent,
        centroids=centroids,
    )


def _colour(object_pixels: np.ndarray, distance: np.ndarray) -> tuple[str, float, np.ndarray]:
    """Nearest palette colour to the median of the objects' cores (pixels [N, 3], float): its
    name ('unknown' when too far), the distance, and the median colour itself."""
    if not len(object_pixels):
        return UNKNOWN, float("inf"), np.full(3, np.nan, np.float32)
    # The farther half from the background: the core, not the antialiased rim.
    median = np.median(object_pixels[distance >= np.median(distance)], axis=0)
    names = list(moving_shapes.PALETTE)
    gaps = np.linalg.norm(np.asarray([moving_shapes.PALETTE[n] for n in names]) - median, axis=-1)
    best = int(gaps.argmin())
    name = names[best] if gaps[best] <= MAX_COLOUR_DISTANCE else UNKNOWN
    return name, float(gaps[best]), median


def _direction(centroids: np.ndarray, coherent: np.ndarray, side: int) -> str:
    """Direction of the least-squares centroid velocity over coherent frames."""
    if len(coherent) == 1:  # an image: nothing moves
        return "still" if coherent[0] else UNKNOWN
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


def score(videos: Sequence[np.ndarray], attributes: Sequence[Mapping[str, Any]]
          ) -> dict[str, float | int]:
    """Prompt adherence of videos (each uint8 [T, H, W, 3]) to attribute names, e.g. from
    `pipeline.eval_prompts`: accuracies per attribute, of all three at once, and the fraction of
    all frames that are coherent."""
    if not len(videos) or len(videos) != len(attributes):
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
