"""The sizes every stored clip obeys, in every dataset, so the models tile it without padding:

    frames          1 + TEMPORAL_MULTIPLE * k, k >= 0 (1 frame is an image)
    height, width   multiples of SPATIAL_MULTIPLE
"""

# The causal VAE encodes the first frame alone and each following group of 4 frames together.
TEMPORAL_MULTIPLE = 4
# The VAE compresses space 4x and the DiT patchifies grids of up to 4x4 latents.
SPATIAL_MULTIPLE = 16


def trim_frames(frames: int) -> int:
    """The longest valid clip length <= frames (>= 1): 1, 5, 9, 13, ..."""
    if frames < 1:
        raise ValueError(f"a clip needs at least 1 frame, got {frames}")
    return 1 + (frames - 1) // TEMPORAL_MULTIPLE * TEMPORAL_MULTIPLE


def check_clip_size(frames: int, height: int, width: int) -> None:
    """Raises unless (frames, height, width) is a valid clip size (see the module docstring)."""
    if frames < 1 or trim_frames(frames) != frames:
        raise ValueError(f"frames must be 1 + {TEMPORAL_MULTIPLE}k with k >= 0 (1, 5, 9, 13, ...);"
                         f" got {frames}")
    if min(height, width) < 1 or height % SPATIAL_MULTIPLE or width % SPATIAL_MULTIPLE:
        raise ValueError(f"height and width must be positive multiples of {SPATIAL_MULTIPLE}; got "
                         f"{height}x{width}")
