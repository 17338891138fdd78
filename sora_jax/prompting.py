"""Prompting with images and videos: given frames stay clean (t = 0), the DiT generates the rest.

Every mode is one mechanism, a window of latent frames at the sampling size in which some latent
frames are given (encoded from pixels) and the others are sampled under the text prompt; the DiT
learns it from the conditioning masks it is trained with (`diffusion/masks.py`):

    animate   --image            the image is the window's first latent frame
    extend    --video --extend   forward: the clip's last frames begin each window; backward: its
                                 first frames end each window; windows slide until --frames
    loop      --loop             a clip, then a transition from its end back to its start
    connect   --connect=A,B      a transition that starts where A ends and ends where B starts
    edit      --video --strength the clip's latents noised to `strength` and denoised (SDEdit)

How pixels become conditioning latents, for a causal VAE compressing time by c (c = 1 for pixel-space
models), and why: a causal VAE encodes a clip's first frame on its own and every later latent
frame from c frames with the past as context, and training clips always start with that lone frame.

    prefix  the last 1 + c*p frames before the generated part, encoded as a clip: p + 1 latent
            frames that begin the window, the first being a frame encoded alone, as in training.
            An image is the prefix p = 0.
    suffix  the first 1 + c*s frames after the generated part, encoded as a clip; its first latent
            (the lone frame) is dropped, and the other s (c frames each, encoded with that frame as
            context) end the window, where they decode to frames 1..c*s of those frames. The
            window's frame before them stands in for frame 0, which the output keeps as given.
    end     with a DiT trained on end_image masks (diffusion/masks.py), connections and loops give
            the next clip's first frame on its own instead of a suffix: encoded alone, it is the
            window's last latent frame, at which the generated latents before it end (as a
            training clip's second-last latent frame ends on the frame of its end image). The DiT
            then sees that frame itself, not latents encoded relative to it.
    edit    the whole clip encoded.

Given latents fix what the DiT sees, not how the generated frames decode next to given pixels: a
causal VAE encodes a clip's later latents relative to its earlier frames, so a suffix encoded on its
own (after its lone first frame) decodes to its pixels only if the generated latents before it lead
into them, and the DiT sees no pixels. Pixel guidance (config.sampling.pixel_guidance, the
`--pixel_guidance` flag; Ho et al. 2022's reconstruction guidance) closes that gap: at every step
the decoded estimate of the clean window is pulled toward the given pixels where they fall in it,
the suffix's first frame included (`sampling.pixel_guidance`). It is what makes backward
extension, loops and connections seamless (experiments/moving_shapes.md); it costs a decoder
backward pass per step.

Given frames are returned as they were read (the decoded window's reconstruction of them is kept
apart for measuring fidelity), so an output is exactly its given frames plus generated ones.

Images and videos are scaled (keeping their aspect ratio) to cover the sampling size and centre-
cropped; a video's frames are used as they are (no stride) and must be long enough for the mode.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

MODES = ("animate", "extend", "loop", "connect", "edit")


def read_image(path: str, height: int, width: int) -> np.ndarray:
    """An image file as float32 [height, width, 3] in [-1, 1] (scaled to cover, centre-cropped)."""
    frames = read_video(path, height, width, what="image")
    if len(frames) != 1:
        raise ValueError(f"{path!r} has {len(frames)} frames; --image takes a still image "
                         "(use --video for clips).")
    return frames[0]


def read_video(path: str, height: int, width: int, what: str = "video") -> np.ndarray:
    """A video (or image) file as float32 [T, height, width, 3] in [-1, 1], every frame scaled to
    cover (height, width) and centre-cropped. Raises a ValueError naming the file if it cannot be
    read."""
    import imageio.v2 as imageio

    from sora_jax.data.video_folder import _rgb, resize_frame

    if not os.path.isfile(path):
        raise ValueError(f"The {what} {path!r} does not exist.")
    try:
        with imageio.get_reader(path) as reader:
            frames = [resize_frame(_rgb(frame), height, width) for frame in reader]
    except Exception as e:  # imageio raises many types for corrupt or unknown files
        raise ValueError(f"Cannot read the {what} {path!r} ({type(e).__name__}: {e}); give a "
                         "readable image (.png, .jpg) or video (.mp4, .gif, .webm).") from None
    if not frames:
        raise ValueError(f"The {what} {path!r} has no frames.")
    return np.stack(frames).astype(np.float32) / 127.5 - 1.0


def choose_mode(*, image: str | None = None, video: str | None = None, extend: str | None = None,
                strength: float | None = None, loop: bool = False,
                connect: list[str] | None = None) -> str | None:
    """The mode of `generate`'s flags, or None for text alone; incompatible flags are refused."""
    given = [name for name, value in (("--image", image), ("--video", video),
                                      ("--connect", connect)) if value]
    if len(given) > 1:
        raise ValueError(f"{' and '.join(given)} cannot be combined: give one image, one video or "
                         "two clips to connect.")
    if extend and not video:
        raise ValueError("--extend needs the clip to extend: --video=FILE.")
    if strength is not None and not video:
        raise ValueError("--strength edits a video: give it with --video=FILE.")
    if extend and strength is not None:
        raise ValueError("--extend and --strength cannot be combined: extend a clip or edit it.")
    if loop and (extend or strength is not None or connect):
        raise ValueError("--loop closes a generated clip (text, --image) or --video into a loop; "
                         "it cannot be combined with --extend, --strength or --connect.")
    if connect and len(connect) != 2:
        raise ValueError(f"--connect takes two clips, A,B; got {len(connect)}: {connect}.")
    if video and not (extend or strength is not None or loop):
        raise ValueError("--video needs what to do with it: --extend=forward|backward, "
                         "--strength=S (edit) or --loop.")
    if loop:
        return "loop"
    if connect:
        return "connect"
    if extend:
        return "extend"
    if strength is not None:
        return "edit"
    return "animate" if image else None


@dataclasses.dataclass
class Prompted:
    """What a mode made, for a batch of B prompts.

    Attributes:
      video: float32 [B, T, H, W, 3] in [-1, 1], given frames as given.
      generated: bool [T], True at generated frames.
      seams: frame indices i where a generated frame meets a given one (between i - 1 and i), and
        for loops T (the wrap from the last frame to the first).
      given: (given frames, the decoded windows' reconstruction of them) pairs, each
        [B, n, H, W, 3]: what given-frame fidelity is measured on.
    """

    video: np.ndarray
    generated: np.ndarray
    seams: list[int]
    given: list[tuple[np.ndarray, np.ndarray]]


class Prompter:
    """Image and video prompting with a trained DiT (an `Experiment` and its inference weights).

    Windows are the experiment's sampling size (config.data.frames x height x width: the training
    size unless `at_sample_size` changed it). Text arrays are [B, L, D] caption tokens and [B, L]
    masks from the experiment's text encoder; `negative` is an optional (tokens, mask) pair.
    """

    def __init__(self, exp, params, *, steps: int, guidance: dict[str, Any]):
        self.exp, self.params, self.steps, self._guidance = exp, params, steps, guidance
        self.pixel_guidance = guidance.get("pixel_guidance", 0.0)
        self._samplers = {}  # windows of other lengths (connect's transitions)
        self.sampler = exp.make_sampler(steps=steps, **guidance)
        self.c = getattr(exp.autoencoder, "temporal_compression", 1)
        self.window = exp.latent_shape[0]  # latent frames per window
        self.end_image = exp.end_image  # connections end on an end image
        self.frames = exp.config.data.frames  # pixel frames per window
        self.height, self.width = exp.config.data.height, exp.config.data.width

    # Latent layout -------------------------------------------------------------------------------

    def pixel_frames(self, latents: int) -> int:
        """Pixel frames of `latents` latent frames starting with a lone frame: 1 + c (n - 1)."""
        return 1 + self.c * (latents - 1)

    def _encode(self, video: np.ndarray) -> np.ndarray:
        return self.exp.encode_video(np.asarray(video, np.float32))

    def prefix_latents(self, frames: np.ndarray) -> np.ndarray:
        """[B, 1 + c p, H, W, 3] frames that precede generated ones -> [B, p + 1, h, w, C]."""
        self._check_clip_length(frames.shape[1], "prefix")
        return self._encode(frames)

    def suffix_latents(self, frames: np.ndarray) -> np.ndarray:
        """[B, 1 + c s, H, W, 3] frames that follow generated ones -> [B, s, h, w, C]."""
        self._check_clip_length(frames.shape[1], "suffix")
        return self._encode(frames)[:, 1:]

    def _check_clip_length(self, n: int, what: str) -> None:
        if (n - 1) % self.c:
            raise ValueError(f"A {what} of {n} frames: conditioning clips have 1 + {self.c}k frames "
                             f"for this model's VAE (e.g. {self.pixel_frames(1)}, "
                             f"{self.pixel_frames(2)}, {self.pixel_frames(3)}).")

    # One window ----------------------------------------------------------------------------------

    def sample_window(self, text, mask, rng, *, prefix=None, suffix=None, end=None, negative=None,
                      window: int | None = None) -> np.ndarray:
        """Decoded window [B, 1 + c (n - 1), H, W, 3] of n = `window` latent frames (default the
        sampling size's), beginning with `prefix` frames [B, 1 + c p, H, W, 3] (p + 1 latents) and
        ending with `suffix` frames [B, 1 + c s, H, W, 3] (s latents) or with an `end` image
        [B, H, W, 3] (one latent, whose frame is the window's frame c (n - 2); the c frames
        decoded after it are meaningless), as the module docstring lays them out. With
        `pixel_guidance`, sampling is also pulled toward these pixels where they fall in the
        decoded window."""
        import jax

        if suffix is not None and end is not None:
            raise ValueError("A window ends with a suffix or an end image, not both.")
        n = window or self.window
        sampler = self.sampler if n == self.window else self._sampler_for(n)
        prefix_latents = None if prefix is None else self.prefix_latents(prefix)
        suffix_latents = None if suffix is None else self.suffix_latents(suffix)
        if end is not None:  # the end image's frame plays the suffix's first frame
            suffix, suffix_latents = end[:, None], self._encode(end[:, None])
        p = 0 if prefix is None else prefix_latents.shape[1]
        s = 0 if suffix is None else suffix_latents.shape[1]
        if p + s >= n:
            raise ValueError(f"{p} + {s} given latent frames leave nothing to generate in a window "
                             f"of {n}; give shorter context or more --frames.")
        b = text.shape[0]
        latent = (b, n, *self.exp.latent_shape[1:])
        given = np.zeros(latent, np.float32)
        is_given = np.zeros((b, n), bool)
        frames = self.pixel_frames(n)
        pixels = np.zeros((b, frames, self.height, self.width, 3), np.float32)
        pixel_weight = np.zeros((b, frames), np.float32)
        if p:
            given[:, :p], is_given[:, :p] = prefix_latents, True
            pixels[:, :prefix.shape[1]], pixel_weight[:, :prefix.shape[1]] = prefix, 1.0
        if s:
            given[:, n - s:], is_given[:, n - s:] = suffix_latents, True
            # The suffix's first frame (the end image) falls on the last frame of the latent before
            # the given ones.
            start = frames - self.c * s - 1
            pixels[:, start:start + suffix.shape[1]] = suffix
            pixel_weight[:, start:start + suffix.shape[1]] = 1.0
        pt = self.exp.temporal_patch
        if n % pt:
            raise ValueError(f"A window of {n} latent frames does not split into temporal patches "
                             f"of {pt}.")
        given_mask = is_given.reshape(b, n // pt, pt).all(-1)  # a partly given patch is generated
        negative = negative or (None, None)
        conditioned = {}
        if p + s:
            conditioned = dict(given=given, given_mask=given_mask)
            if self.pixel_guidance > 0:
                conditioned.update(pixels=pixels, pixel_weight=pixel_weight)
        video = sampler(self.params, text, mask, rng, *negative, **conditioned)
        return np.asarray(jax.device_get(video))

    def _sampler_for(self, latents: int):
        """A sampler for windows of another length (connect's transitions), made once per length."""
        from sora_jax.training.experiment import Experiment, at_sample_size

        if latents not in self._samplers:
            config = at_sample_size(self.exp.config, frames=self.pixel_frames(latents))
            exp = Experiment(config, self.exp.devices)
            self._samplers[latents] = exp.make_sampler(steps=self.steps, **self._guidance)
        return self._samplers[latents]

    # Modes ---------------------------------------------------------------------------------------

    def animate(self, image: np.ndarray, text, mask, rng, negative=None) -> Prompted:
        """A clip of the sampling size whose first frame is `image` [B, H, W, 3]."""
        first = image[:, None]
        window = self.sample_window(text, mask, rng, prefix=first,
                                    negative=negative)
        video = np.concatenate([first, window[:, 1:]], axis=1)
        generated = np.arange(video.shape[1]) > 0
        return Prompted(video, generated, [1], [(first, window[:, :1])])

    def extend(self, video: np.ndarray, text, mask, rng, *, frames: int, direction: str = "forward",
               context_frames: int | None = None, negative=None) -> Prompted:
        """`video` [B, T, H, W, 3] continued after its end ('forward') or before its start
        ('backward') to `frames` frames in all, one window at a time: each window is conditioned on
        the latest `context_frames` (1 + c k; default about half a window) and positions restart
        at each window, so memory does not grow with the length."""
        import jax

        if direction not in ("forward", "backward"):
            raise ValueError(f"--extend must be 'forward' or 'backward', got {direction!r}.")
        context = context_frames or self.pixel_frames(max(1, (self.window + 1) // 2))
        self._check_clip_length(context, "--context_frames")
        # forward: a prefix of p + 1 latents, backward: a suffix of p; either way a window makes
        # c (window - 1 - p) new frames.
        if context > self.pixel_frames(self.window - 1):
            raise ValueError(f"--context_frames={context} fills the whole window of {self.frames} "
                             f"frames; use at most {self.pixel_frames(self.window - 1)}.")
        if video.shape[1] < context:
            raise ValueError(f"The video has {video.shape[1]} frames; extending it takes at least "
                             f"--context_frames={context}.")
        if frames <= video.shape[1]:
            raise ValueError(f"--frames={frames} must exceed the video's {video.shape[1]} frames: "
                             "it is the length of the extended video.")
        out = video
        generated = np.zeros(video.shape[1], bool)
        seams, pairs, window = [], [], 0
        while out.shape[1] < frames:
            key = jax.random.fold_in(rng, window)
            if direction == "forward":
                tail = out[:, -context:]
                decoded = self.sample_window(text, mask, key, prefix=tail,
                                             negative=negative)
                new = decoded[:, context:]
                pairs.append((tail, decoded[:, :context]))
                seams.append(out.shape[1])
                out = np.concatenate([out, new], axis=1)
                generated = np.concatenate([generated, np.ones(new.shape[1], bool)])
            else:
                head = out[:, :context]
                decoded = self.sample_window(text, mask, key, suffix=head,
                                             negative=negative)
                new = decoded[:, :decoded.shape[1] - context]  # the last one stands for head[0]
                pairs.append((head[:, 1:], decoded[:, decoded.shape[1] - context + 1:]))
                out = np.concatenate([new, out], axis=1)
                seams = [new.shape[1]] + [i + new.shape[1] for i in seams]
                generated = np.concatenate([np.ones(new.shape[1], bool), generated])
            window += 1
        if direction == "forward":
            out, generated = out[:, :frames], generated[:frames]
            seams = [i for i in seams if i < frames]
        else:
            cut = out.shape[1] - frames
            out, generated = out[:, cut:], generated[cut:]
            seams = [i - cut for i in seams if i - cut > 0]
        return Prompted(out, generated, seams, pairs)

    def connect(self, a: np.ndarray, b: np.ndarray, text, mask, rng, *, frames: int | None = None,
                negative=None) -> Prompted:
        """A transition of `frames` frames (c g - 1 for g generated latents; default fills the
        sampling window) from the last frame of `a` [B, Ta, ...] to the first 1 + c frames of `b`
        [B, Tb, ...] (its first frame alone with end images): the output is a, the transition,
        then b."""
        if b.shape[1] < 1 + self.c and not self.end_image:
            raise ValueError(f"The clip to connect to has {b.shape[1]} frames; it needs at least "
                             f"{1 + self.c}.")
        g = self.window - 2 if frames is None else (frames + 1) // self.c
        if g < 1 or (frames is not None and frames != self.c * g - 1):
            valid = ", ".join(str(self.c * k - 1) for k in range(1, 5))
            raise ValueError(f"A transition of {frames} frames: transitions have {self.c}g - 1 "
                             f"frames for g generated latent frames ({valid}, ...).")
        if self.end_image:
            decoded = self.sample_window(text, mask, rng, prefix=a[:, -1:], end=b[:, 0],
                                         negative=negative, window=g + 2)
            given_end = (b[:, :1], decoded[:, self.c * g:self.c * g + 1])
        else:
            head = b[:, :1 + self.c]
            decoded = self.sample_window(text, mask, rng, prefix=a[:, -1:], suffix=head,
                                         negative=negative, window=g + 2)
            given_end = (head[:, 1:], decoded[:, self.c * g + 1:])
        transition = decoded[:, 1:self.c * g]
        video = np.concatenate([a, transition, b], axis=1)
        generated = np.zeros(video.shape[1], bool)
        start = a.shape[1]
        generated[start:start + transition.shape[1]] = True
        pairs = [(a[:, -1:], decoded[:, :1]), given_end]
        return Prompted(video, generated, [start, start + transition.shape[1]], pairs)

    def loop(self, video: np.ndarray, text, mask, rng, *, frames: int | None = None,
             negative=None) -> Prompted:
        """`video` closed into a loop: a transition from its end back to its start, after which it
        plays again from its first frame; seams include the wrap (index T)."""
        joined = self.connect(video, video[:, :1 + self.c], text, mask, rng, frames=frames,
                              negative=negative)
        end = video.shape[1] + int(joined.generated.sum())
        return Prompted(joined.video[:, :end], joined.generated[:end],
                        [joined.seams[0], end], joined.given)

    def edit(self, video: np.ndarray, text, mask, rng, *, strength: float,
             negative=None) -> Prompted:
        """`video` [B, T, H, W, 3] (T the sampling size's frames) redrawn under the prompt: its
        latents noised to `strength` in (0, 1] and denoised (SDEdit); low strength keeps more."""
        import jax

        from sora_jax.diffusion.sampling import strength_start

        if video.shape[1] != self.frames:
            raise ValueError(f"Editing takes clips of the sampling size's {self.frames} frames; "
                             f"this one has {video.shape[1]} (set --frames={video.shape[1]} if "
                             f"it is 1 + {self.c}k).")
        start = strength_start(self.steps, strength)
        negative = negative or (None, None)
        out = self.sampler(self.params, text, mask, rng, *negative, init=self._encode(video),
                           start=start)
        return Prompted(np.asarray(jax.device_get(out)), np.ones(video.shape[1], bool), [], [])
