r"""Generates videos from text with a trained workdir's EMA weights.

  python -m sora_jax.generate --workdir=DIR --prompt="a red square slides to the left" \
      --out=samples.mp4 [--frames N --height H --width W --steps S --seed K --num_samples M \
      --guidance G --guidance_rescale PHI --guidance_interval=LO,HI --negative_prompt="..." \
      --expand_prompt=moving_shapes|URL]

Several --prompt flags give several videos; all samples are tiled side by side into --out
(.mp4, .gif, or .png for a grid of frames). The model and its sizes come from the workdir's config,
and the guidance settings default to its config.sampling. One --negative_prompt applies to every
prompt; repeated once per --prompt, each applies to its own.

Prompted with images and videos (`sora_jax/prompting.py` says how given pixels condition the DiT):

  --image=FILE                                    animate a still image (its first frame)
  --video=FILE --extend=forward|backward --frames=N   continue a clip to N frames in all, window
                                                  by window (--context_frames of it at a time)
  --loop [--image=FILE | --video=FILE]            a seamless loop of a generated clip or a video
  --video=FILE --strength=S                       edit a video: noise to S in (0, 1], denoise
                                                  under the prompt (lower S keeps more of it)
  --connect=A,B [--frames=N]                      a transition of N frames from clip A to clip B

Images and videos are scaled to cover the sampling size and centre-cropped. The output shows the
given frames as given and the generated ones around them.

--expand_prompt rewrites each prompt as a detailed caption first (`prompt_expansion`): offline
for the moving_shapes vocabulary, or through any OpenAI-compatible chat endpoint given by URL
(--expand_model; the key, if any, from the environment variable --expand_api_key_env). If
expansion fails, the error is logged and the original prompts are used.
"""

from absl import app, flags, logging

FLAGS = flags.FLAGS


def pair_negative_prompts(prompts: list[str], negative_prompts: list[str] | None):
    """One negative prompt per prompt: a single one is shared, otherwise one each; None for none."""
    if not negative_prompts:
        return None
    if len(negative_prompts) == 1:
        return negative_prompts * len(prompts)
    if len(negative_prompts) != len(prompts):
        raise ValueError(f"Give one --negative_prompt for all prompts or one per --prompt "
                         f"({len(prompts)}), not {len(negative_prompts)}.")
    return list(negative_prompts)


def parse_interval(text: str | None) -> tuple[float, float] | None:
    """'lo,hi' -> (lo, hi); None stays None."""
    if text is None:
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--guidance_interval must be 'lo,hi', e.g. 0.1,0.9; "
                         f"got {text!r}.") from None
    return lo, hi


def generate(workdir: str, prompts: list[str], out: str, *, frames=None, height=None, width=None,
             steps=None, guidance=None, guidance_rescale=None, guidance_interval=None,
             negative_prompts=None, seed=0, num_samples=1, checkpoint_step=None,
             expand_prompt=None, expand_model="gpt-4o-mini", expand_api_key_env="OPENAI_API_KEY",
             rope=None, image=None, video=None, extend=None, strength=None, loop=False,
             connect=None, context_frames=None, pixel_guidance=None):
    """Samples `num_samples` videos per prompt, writes them tiled to `out`, returns (path, videos).

    expand_prompt: None, 'moving_shapes' or an OpenAI-compatible endpoint URL
    (`prompt_expansion.get_prompt_expander`); prompts are expanded before encoding.
    rope: None (the config's), 'extrapolate' or 'interpolate': RoPE positions at sizes larger than
    training's (`Experiment._rope_scale`).

    image, video, extend, strength, loop, connect, context_frames: image and video prompts (see
    the module docstring and `prompting.Prompter`); with extend or connect, `frames` is the
    length of the extended video or of the transition, not the sampling size. pixel_guidance:
    the step size pulling them toward their given pixels (`sampling.pixel_guidance`; 0 is off,
    None the config's).

    guidance, guidance_rescale, guidance_interval: `sampling.Guidance`'s scale, rescale and
    (lo, hi); None takes the workdir's config.sampling. negative_prompts: None, one for every
    prompt, or one per prompt; the unconditional branch of guidance sees them.
    """
    import jax
    import numpy as np

    from sora_jax.data.video_io import check_writable, write_video
    from sora_jax.training.checkpoint import restore_for_inference
    from sora_jax.training.experiment import (Experiment, at_sample_size, guidance_settings,
                                              to_uint8)
    from sora_jax.training.loop import load_config

    from sora_jax import prompting

    mode = prompting.choose_mode(image=image, video=video, extend=extend, strength=strength,
                                 loop=loop, connect=connect)
    check_writable(out)
    if not prompts or any(not p.strip() for p in prompts):
        raise ValueError("Every --prompt must be non-empty text, e.g. --prompt='a red square slides left'.")
    if num_samples < 1:
        raise ValueError(f"--num_samples must be at least 1, got {num_samples}.")
    negative_prompts = pair_negative_prompts(prompts, negative_prompts)
    if expand_prompt:
        from sora_jax.prompt_expansion import expand_prompts, get_prompt_expander
        expander = get_prompt_expander(expand_prompt, model=expand_model,
                                       api_key_env=expand_api_key_env, seed=seed)
        prompts = expand_prompts(prompts, expander)
    config = load_config(workdir)
    sample_frames = None if mode in ("extend", "connect") else frames
    edit_clip = None
    if mode == "edit":  # read once; sampled at its own length, cut to 1 + ck frames, by default
        edit_clip = prompting.read_video(video, height or config.data.height,
                                         width or config.data.width)
        c = config.autoencoder.get("temporal_compression") or 1
        sample_frames = frames or 1 + (len(edit_clip) - 1) // c * c
    config = at_sample_size(config, frames=sample_frames, height=height, width=width, rope=rope)
    exp = Experiment(config)
    settings = guidance_settings(config.sampling, guidance=guidance,
                                 guidance_rescale=guidance_rescale,
                                 guidance_interval=guidance_interval,
                                 pixel_guidance=pixel_guidance)
    steps = steps or config.sampling.steps
    state, step = restore_for_inference(workdir, exp.abstract_state(), checkpoint_step)
    params = state.groups["dit"].inference_params
    repeat = lambda texts: [p for p in texts for _ in range(num_samples)]
    text, mask = exp.text_encoder.encode(repeat(prompts))
    negative_text = negative_mask = None
    if negative_prompts is not None:
        negative_text, negative_mask = exp.text_encoder.encode(repeat(negative_prompts))
    rng = jax.random.key(seed)
    if mode is None:
        sampler = exp.make_sampler(steps=steps, **settings)
        video = sampler(params, text, mask, rng, negative_text, negative_mask)
    else:
        video = _prompted(mode, prompting.Prompter(exp, params, steps=steps, guidance=settings),
                          text, mask, rng, (negative_text, negative_mask), image=image,
                          video=video, extend=extend, strength=strength, connect=connect,
                          frames=frames, context_frames=context_frames, edit_clip=edit_clip)
    videos = to_uint8(jax.device_get(video))
    path = write_video(out, videos)
    logging.info("Checkpoint step %d: %d videos of %s frames at %sx%s -> %s", step, len(videos),
                 *videos.shape[1:4], path)
    return path, np.asarray(videos)


def _prompted(mode, prompter, text, mask, rng, negative, *, image, video, extend, strength,
              connect, frames, context_frames, edit_clip):
    """Runs an image/video prompting mode for the batch of prompts: video [B, T, H, W, 3]."""
    import jax
    import numpy as np

    from sora_jax.prompting import read_image, read_video

    batch = text.shape[0]
    size = (prompter.height, prompter.width)
    tile = lambda x: np.repeat(np.asarray(x)[None], batch, axis=0)
    negative = negative if negative[0] is not None else None
    if mode == "animate":
        return prompter.animate(tile(read_image(image, *size)), text, mask, rng, negative).video
    if mode == "extend":
        if frames is None:
            raise ValueError("--extend needs --frames: the length of the extended video.")
        clip = tile(read_video(video, *size))
        return prompter.extend(clip, text, mask, rng, frames=frames, direction=extend,
                               context_frames=context_frames, negative=negative).video
    if mode == "edit":
        clip = tile(edit_clip)[:, :prompter.frames]
        return prompter.edit(clip, text, mask, rng, strength=strength, negative=negative).video
    if mode == "connect":
        a, b = (tile(read_video(path, *size)) for path in connect)
        return prompter.connect(a, b, text, mask, rng, frames=frames, negative=negative).video
    # loop: of the given video, or of a clip made from text (and --image) first
    if video:
        clip = tile(read_video(video, *size))
    elif image:
        clip = prompter.animate(tile(read_image(image, *size)), text, mask, rng, negative).video
    else:
        clip = prompter.sampler(prompter.params, text, mask, rng, *(negative or (None, None)))
        clip = np.asarray(clip)
    return prompter.loop(clip, text, mask, jax.random.fold_in(rng, 1), negative=negative).video


def define_flags():
    """Command-line flags, defined only when run as a program so the module imports cleanly."""
    flags.DEFINE_string("workdir", None, "A training workdir.")
    flags.DEFINE_multi_string("prompt", None, "Text prompt; repeat for several.")
    flags.DEFINE_string("out", None, "Output file: .mp4, .gif or .png (frame grid).")
    flags.DEFINE_integer("frames", None, "Frames (default: the training clip length).")
    flags.DEFINE_integer("height", None, "Height in pixels (default: training height).")
    flags.DEFINE_integer("width", None, "Width in pixels (default: training width).")
    flags.DEFINE_integer("steps", None, "Sampling steps (default: config.sampling.steps).")
    flags.DEFINE_float("guidance", None, "Classifier-free guidance scale (default: "
                       "config.sampling).")
    flags.DEFINE_float("guidance_rescale", None, "Guidance rescale phi in [0, 1] (Lin et al. 2023; "
                       "default: config.sampling).")
    flags.DEFINE_string("guidance_interval", None, "lo,hi: guide only at times lo <= t <= hi, "
                        "t = 1 noise, 0 data (default: config.sampling).")
    flags.DEFINE_multi_string("negative_prompt", None, "What guidance steers away from: one "
                              "for all prompts, or repeated once per --prompt.")
    flags.DEFINE_string("expand_prompt", None, "Rewrite prompts as detailed captions first: "
                        "'moving_shapes' (offline) or an OpenAI-compatible endpoint URL, e.g. "
                        "http://localhost:8000/v1.")
    flags.DEFINE_string("expand_model", "gpt-4o-mini", "Model name sent to the --expand_prompt "
                        "endpoint.")
    flags.DEFINE_string("expand_api_key_env", "OPENAI_API_KEY", "Environment variable holding "
                        "the endpoint's API key (sent only when set).")
    flags.DEFINE_enum("rope", None, ["extrapolate", "interpolate"], "Positions at sizes beyond "
                      "training's: continue them (extrapolate) or compress them into the trained "
                      "range (interpolate). Default: config.sampling.rope, else extrapolate.")
    flags.DEFINE_string("image", None, "Animate this image: it is the first frame.")
    flags.DEFINE_string("video", None, "A video to --extend, edit (--strength) or --loop.")
    flags.DEFINE_enum("extend", None, ["forward", "backward"], "Continue --video after its end "
                      "or before its start, to --frames frames in all.")
    flags.DEFINE_integer("context_frames", None, "Frames of the clip each extension window is "
                         "conditioned on (1 + 4k for a 4x temporal VAE; default: half a window).")
    flags.DEFINE_float("strength", None, "Edit --video under the prompt: noise it to this "
                       "strength in (0, 1] and denoise (SDEdit); lower keeps more of it.")
    flags.DEFINE_bool("loop", False, "Close the clip (from text, --image or --video) into a "
                      "seamless loop.")
    flags.DEFINE_list("connect", None, "A,B: a transition from the end of clip A to the start of "
                      "clip B (--frames: its length).")
    flags.DEFINE_float("pixel_guidance", None, "Image and video prompts: step size pulling the "
                       "decoded video toward the given frames each step (0 = off; default: "
                       "config.sampling.pixel_guidance).")
    flags.DEFINE_integer("seed", 0, "Random seed.")
    flags.DEFINE_integer("num_samples", 1, "Samples per prompt.")
    flags.DEFINE_integer("checkpoint_step", None, "Checkpoint step (default: latest).")
    flags.mark_flags_as_required(["workdir", "prompt", "out"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    path, _ = generate(FLAGS.workdir, FLAGS.prompt, FLAGS.out, frames=FLAGS.frames,
                       height=FLAGS.height, width=FLAGS.width, steps=FLAGS.steps,
                       guidance=FLAGS.guidance, guidance_rescale=FLAGS.guidance_rescale,
                       guidance_interval=parse_interval(FLAGS.guidance_interval),
                       negative_prompts=FLAGS.negative_prompt, seed=FLAGS.seed,
                       num_samples=FLAGS.num_samples, checkpoint_step=FLAGS.checkpoint_step,
                       expand_prompt=FLAGS.expand_prompt, expand_model=FLAGS.expand_model,
                       expand_api_key_env=FLAGS.expand_api_key_env, rope=FLAGS.rope,
                       image=FLAGS.image, video=FLAGS.video, extend=FLAGS.extend,
                       strength=FLAGS.strength, loop=FLAGS.loop, connect=FLAGS.connect,
                       context_frames=FLAGS.context_frames, pixel_guidance=FLAGS.pixel_guidance)
    print(path)


if __name__ == "__main__":
    define_flags()
    app.run(main)
