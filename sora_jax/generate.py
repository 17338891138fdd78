r"""Generates videos from text with a trained workdir's EMA weights.

  python -m sora_jax.generate --workdir=DIR --prompt="a red square slides to the left" \
      --out=samples.mp4 [--frames N --height H --width W --steps S --guidance G --seed K \
      --num_samples M]

Several --prompt flags give several videos; all samples are tiled side by side into --out
(.mp4, .gif, or .png for a grid of frames). The model and its sizes come from the workdir's config.
"""

from absl import app, flags, logging

FLAGS = flags.FLAGS


def generate(workdir: str, prompts: list[str], out: str, *, frames=None, height=None, width=None,
             steps=None, guidance=None, seed=0, num_samples=1, checkpoint_step=None):
    """Samples `num_samples` videos per prompt, writes them tiled to `out`, returns (path, videos)."""
    import jax
    import numpy as np

    from sora_jax.data.video_io import check_writable, write_video
    from sora_jax.training.checkpoint import restore_for_inference
    from sora_jax.training.experiment import Experiment, to_uint8
    from sora_jax.training.loop import load_config

    check_writable(out)
    if not prompts or any(not p.strip() for p in prompts):
        raise ValueError("Every --prompt must be non-empty text, e.g. --prompt='a red square slides left'.")
    if num_samples < 1:
        raise ValueError(f"--num_samples must be at least 1, got {num_samples}.")
    config = load_config(workdir)
    with config.unlocked():
        config.data.frames = frames or config.data.frames
        config.data.height = height or config.data.height
        config.data.width = width or config.data.width
    exp = Experiment(config)
    state, step = restore_for_inference(workdir, exp.abstract_state(), checkpoint_step)
    sampler = exp.make_sampler(steps=steps or config.sampling.steps,
                               guidance=config.sampling.guidance if guidance is None else guidance)
    all_prompts = [p for p in prompts for _ in range(num_samples)]
    text, mask = exp.text_encoder.encode(all_prompts)
    video = sampler(state.groups["dit"].inference_params, text, mask, jax.random.key(seed))
    videos = to_uint8(jax.device_get(video))
    path = write_video(out, videos)
    logging.info("Checkpoint step %d: %d videos of %s frames at %sx%s -> %s", step, len(videos),
                 *videos.shape[1:4], path)
    return path, np.asarray(videos)


def define_flags():
    """Command-line flags, defined only when run as a program so the module imports cleanly."""
    flags.DEFINE_string("workdir", None, "A training workdir.")
    flags.DEFINE_multi_string("prompt", None, "Text prompt; repeat for several.")
    flags.DEFINE_string("out", None, "Output file: .mp4, .gif or .png (frame grid).")
    flags.DEFINE_integer("frames", None, "Frames (default: the training clip length).")
    flags.DEFINE_integer("height", None, "Height in pixels (default: training height).")
    flags.DEFINE_integer("width", None, "Width in pixels (default: training width).")
    flags.DEFINE_integer("steps", None, "Sampling steps (default: config.sampling.steps).")
    flags.DEFINE_float("guidance", None, "Classifier-free guidance scale.")
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
                       guidance=FLAGS.guidance, seed=FLAGS.seed, num_samples=FLAGS.num_samples,
                       checkpoint_step=FLAGS.checkpoint_step)
    print(path)


if __name__ == "__main__":
    define_flags()
    app.run(main)
