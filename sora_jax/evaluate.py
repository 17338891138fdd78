r"""Evaluates a trained workdir and prints one JSON object.

  python -m sora_jax.evaluate --workdir=DIR [--num_prompts N | --num_videos N] [--split S]
      [--rephrase train|synonyms|word_order|long] [--expand_prompt moving_shapes|URL]
      [--frames N --height H --width W]
  python -m sora_jax.evaluate --workdir=DIR --prompting=animate|extend_forward|extend_backward|loop|
      connect|edit [--frames N] [--strength S] [--context_frames K]

The task comes from the workdir's saved config. For text-to-video, videos are generated for
held-out prompts (attribute combinations and phrasings never seen in training) and an analytic
detector reads colour, shape, motion direction and per-frame coherence from their pixels; the same
detector's scores on the real videos of those prompts are reported beside them as its reference.
For a VAE, held-out clips are encoded and decoded, and the JSON gives reconstruction PSNR and SSIM
at the VAE's compression; originals above reconstructions go to DIR/eval/*.gif.
With --prompting, the DiT is prompted with the split's own clips and images and the JSON gives
given-frame fidelity, continuity at seams and adherence (see eval/prompting_eval.py).
"""

import json
import os

from absl import app, flags, logging

from sora_jax import paths

FLAGS = flags.FLAGS


def evaluate_text_to_video(workdir, config, *, num_prompts=None, steps=None, guidance=None, seed=0,
                           checkpoint_step=None, split=None, rephrase=None,
                           expand_prompt=None, frames=None, height=None, width=None,
                           rope=None) -> dict:
    """Prompt adherence of generated videos on the config's held-out split.

    `rephrase` (moving_shapes only) replaces each caption by the same attributes worded in one of
    `moving_shapes.REPHRASINGS` ('train', 'synonyms', 'word_order', 'long'), to measure how
    adherence depends on the wording alone. `expand_prompt` passes the captions through a prompt
    expander first, as `generate --expand_prompt` does. `frames`, `height`, `width` generate at
    another size than the training clips' (e.g. twice the duration, another aspect ratio).
    """
    import jax
    import numpy as np
    import tqdm

    from sora_jax.data import pipeline
    from sora_jax.data.video_io import write_video
    from sora_jax.eval import detector
    from sora_jax.training.checkpoint import restore_for_inference
    from sora_jax.training.experiment import (Experiment, at_sample_size, guidance_settings,
                                              to_uint8)

    config = at_sample_size(config, frames=frames, height=height, width=width, rope=rope)
    exp = Experiment(config)
    state, step = restore_for_inference(workdir, exp.abstract_state(), checkpoint_step)
    steps = steps or config.sampling.steps
    guidance = config.sampling.guidance if guidance is None else guidance
    num_prompts = num_prompts or config.eval.num_prompts
    data_kw = pipeline.data_kwargs(config.data)  # video_folder's config object included
    split = split or config.data.eval_split
    prompts = pipeline.eval_prompts(**data_kw, split=split, num=num_prompts)
    if len(prompts) < num_prompts:
        logging.warning("Only %d prompts in split %r.", len(prompts), split)
    if rephrase is not None:
        prompts = rephrase_prompts(prompts, config.data.name, rephrase, seed)
    if expand_prompt is not None:
        from sora_jax.prompt_expansion import expand_prompts, get_prompt_expander
        expanded = expand_prompts([p["caption"] for p in prompts],
                                  get_prompt_expander(expand_prompt, seed=seed))
        prompts = [dict(p, caption=c) for p, c in zip(prompts, expanded)]
    settings = guidance_settings(config.sampling, guidance=guidance)
    sampler = exp.make_sampler(steps=steps, **settings)
    params = state.groups["dit"].inference_params
    batch_size = config.eval.batch_size
    videos = []
    for start in tqdm.tqdm(range(0, len(prompts), batch_size), desc="generate", unit="batch"):
        chunk = [p["caption"] for p in prompts[start:start + batch_size]]
        padded = chunk + [chunk[-1]] * (batch_size - len(chunk))  # one compiled shape
        text, mask = exp.text_encoder.encode(padded)
        video = sampler(params, text, mask, jax.random.fold_in(jax.random.key(seed), start))
        videos.append(to_uint8(jax.device_get(video))[: len(chunk)])
    videos = np.concatenate(videos)
    generated = detector.score(videos, prompts)
    reference = detector.score([p["video"] for p in prompts], prompts) \
        if "video" in prompts[0] else None
    out_dir = os.path.join(workdir, "eval")
    name = (f"step_{step:06d}_{split}{'_' + rephrase if rephrase else ''}"
            f"{'_expanded' if expand_prompt else ''}_g{guidance:g}_s{steps}"
            f"{'_interpolated' if config.sampling.get('rope') == 'interpolate' else ''}"
            f"_{config.data.frames}x{config.data.height}x{config.data.width}")
    write_video(os.path.join(out_dir, name + ".gif"), videos[:16])
    result = {
        "task": config.task,
        "workdir": os.fspath(paths.path(workdir)),
        "checkpoint_step": int(step),
        "split": split,
        "size": [config.data.frames, config.data.height, config.data.width],
        "rope": config.sampling.get("rope", "extrapolate"),
        "phrasing": rephrase or "dataset",
        "expand_prompt": expand_prompt,
        "num_prompts": len(prompts),
        "sampling_steps": steps,
        "guidance": guidance,
        "guidance_rescale": settings["guidance_rescale"],
        "guidance_interval": list(settings["guidance_interval"]),
        "seed": seed,
        **generated,
    }
    if reference is not None:
        result["detector_on_real_videos"] = reference
    paths.write_text(os.path.join(out_dir, name + ".json"), json.dumps(result, indent=2))
    return result


def rephrase_prompts(prompts: list[dict], dataset: str, style: str, seed: int) -> list[dict]:
    """The prompts with each caption reworded in `style` from its labels (see
    `moving_shapes.rephrase`); deterministic given `seed`."""
    import numpy as np

    from sora_jax.data import moving_shapes

    if dataset != "moving_shapes":
        raise ValueError(f"--rephrase is defined for the moving_shapes dataset, not {dataset!r}.")
    return [
        dict(p, caption=moving_shapes.rephrase(p["colour"], p["shape"], p["direction"],
                                               np.random.default_rng((seed, i)), style))
        for i, p in enumerate(prompts)
    ]


def evaluate_vae(workdir, config, *, num_videos=None, seed=0, checkpoint_step=None, split=None,
                 **unused) -> dict:
    """Reconstruction PSNR and SSIM of a VAE on held-out clips; writes originals above
    reconstructions, side by side."""
    if any(v is not None for v in unused.values()):
        raise ValueError(f"Options {sorted(k for k, v in unused.items() if v is not None)} do not "
                         "apply to a VAE workdir.")
    import jax
    import numpy as np

    from sora_jax.data import pipeline
    from sora_jax.data.video_io import write_video
    from sora_jax.eval import reconstruction as metrics
    from sora_jax.training.experiment import to_uint8
    from sora_jax.training.vae_experiment import load_vae

    del seed  # the posterior mean is deterministic
    vae, params = load_vae(workdir, checkpoint_step)
    step = checkpoint_step
    split = split or config.data.eval_split
    num_videos = num_videos or config.eval.num_videos
    loader = pipeline.make_loader(
        name=config.data.name, builder_config=config.data.builder_config,
        data_dir=config.data.data_dir, split=split, batch_size=config.eval.batch_size, seed=0,
        shuffle=False, num_epochs=1, drop_remainder=False,
        shard_options=None)
    reconstruct = jax.jit(lambda p, v: jax.numpy.clip(vae.decode(p, vae.encode(p, v)), -1, 1))
    originals, recons = [], []
    for batch in loader:
        originals.append(batch["video"])
        recons.append(np.asarray(reconstruct(params, batch["video"])))
        if sum(len(o) for o in originals) >= num_videos:
            break
    originals = np.concatenate(originals)[:num_videos]
    recons = np.concatenate(recons)[:num_videos]
    from sora_jax.training.checkpoint import Checkpointer
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    step = step if step is not None else ckpt.latest_step()
    ckpt.close()
    out_dir = os.path.join(workdir, "eval")
    name = f"step_{step:06d}_{split}"
    pairs = np.concatenate([to_uint8(originals[:16]), to_uint8(recons[:16])], axis=2)
    write_video(os.path.join(out_dir, name + ".gif"), pairs)
    c = config.data
    t, h, w, ch = vae.latent_shape(c.frames, c.height, c.width)
    psnr, ssim = metrics.psnr(recons, originals), metrics.ssim(recons, originals)
    result = {
        "task": config.task,
        "workdir": os.fspath(paths.path(workdir)),
        "checkpoint_step": int(step),
        "split": split,
        "num_videos": len(originals),
        "latent_shape": [t, h, w, ch],
        # Values per latent value: s_t * s_s^2 * 3 / C for the VAE, and for these clips (whose lone
        # first frame makes it lower).
        "compression": vae.temporal_compression * vae.spatial_compression ** 2 * 3 / ch,
        "compression_of_these_clips": c.frames * c.height * c.width * 3 / (t * h * w * ch),
        "psnr": float(np.mean(psnr)),
        "psnr_p10": float(np.percentile(psnr, 10)),
        "ssim": float(np.mean(ssim)),
    }
    if originals.shape[1] > 1:  # flicker, and the seam a perfect latent model would leave
        result.update(metrics.temporal_consistency(recons, originals))
    paths.write_text(os.path.join(out_dir, name + ".json"), json.dumps(result, indent=2))
    return result


EVALUATORS = {"text_to_video": evaluate_text_to_video, "vae": evaluate_vae}


def evaluate(workdir: str, prompting: str | None = None, **kwargs) -> dict:
    """Evaluates the workdir's task; `prompting` names an image/video prompting task instead
    (`eval/prompting_eval.py`: animate, extend_forward, extend_backward, loop, connect, edit)."""
    from sora_jax.training.loop import load_config

    config = load_config(workdir)
    if prompting:
        from sora_jax.eval.prompting_eval import evaluate_prompting
        if config.task != "text_to_video":
            raise ValueError(f"--prompting evaluates a text-to-video DiT, not a {config.task!r} "
                             "workdir.")
        return evaluate_prompting(workdir, config, task=prompting, **kwargs)
    if config.task not in EVALUATORS:
        raise ValueError(f"No evaluation for task {config.task!r}; known: {sorted(EVALUATORS)}.")
    return EVALUATORS[config.task](workdir, config, **kwargs)


def load_task(workdir: str) -> str:
    from sora_jax.training.loop import load_config
    return load_config(workdir).task


def define_flags():
    """Command-line flags, defined only when run as a program so the module imports cleanly."""
    flags.DEFINE_string("workdir", None, "A training workdir.")
    flags.DEFINE_integer("num_prompts", None, "Held-out prompts (default: config.eval).")
    flags.DEFINE_integer("num_videos", None, "VAE: held-out clips (default: config.eval).")
    flags.DEFINE_integer("steps", None, "Sampling steps (default: config.sampling.steps).")
    flags.DEFINE_float("guidance", None, "Guidance scale (default: config.sampling).")
    flags.DEFINE_integer("seed", 0, "Random seed.")
    flags.DEFINE_string("split", None, "Dataset split (default: config.data.eval_split, held "
                                 "out); e.g. 'validation' to tune sampling settings without it.")
    flags.DEFINE_string("rephrase", None, "Reword every prompt of the split from its attributes "
                        "(moving_shapes): 'train' (training wording), 'synonyms' (held-out "
                        "synonyms), 'word_order' (unseen word order) or 'long' (longer sentences).")
    flags.DEFINE_integer("frames", None, "Generate this many frames (default: training's).")
    flags.DEFINE_enum("rope", None, ["extrapolate", "interpolate"], "Positions at sizes beyond "
                      "training's (default: config.sampling.rope, else extrapolate).")
    flags.DEFINE_integer("height", None, "Generate at this height (default: training's).")
    flags.DEFINE_integer("width", None, "Generate at this width (default: training's).")
    flags.DEFINE_string("expand_prompt", None, "Expand every prompt first: 'moving_shapes' "
                        "(offline) or an OpenAI-compatible endpoint URL.")
    flags.DEFINE_enum("prompting", None, ["animate", "extend_forward", "extend_backward", "loop",
                                          "connect", "edit"],
                      "Measure prompting with images and videos instead (given-frame PSNR, seam "
                      "continuity, adherence; see eval/prompting_eval.py). --frames: the "
                      "extended length or the transition's.")
    flags.DEFINE_float("strength", 0.7, "--prompting=edit: the editing strength.")
    flags.DEFINE_integer("context_frames", None, "--prompting=extend_*: frames each window is "
                         "conditioned on.")
    flags.DEFINE_float("pixel_guidance", None, "--prompting: step size of pixel guidance toward "
                       "the given frames (0 = off; default: config.sampling).")
    flags.DEFINE_integer("checkpoint_step", None, "Checkpoint step (default: latest).")
    flags.mark_flags_as_required(["workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    kwargs = dict(seed=FLAGS.seed, checkpoint_step=FLAGS.checkpoint_step, split=FLAGS.split)
    config_task = load_task(FLAGS.workdir)
    if FLAGS.prompting:
        kwargs.update(prompting=FLAGS.prompting, num_prompts=FLAGS.num_prompts, steps=FLAGS.steps,
                      guidance=FLAGS.guidance, frames=FLAGS.frames, strength=FLAGS.strength,
                      context_frames=FLAGS.context_frames, pixel_guidance=FLAGS.pixel_guidance)
    elif config_task == "vae":
        kwargs.update(num_videos=FLAGS.num_videos)
    else:
        kwargs.update(num_prompts=FLAGS.num_prompts, steps=FLAGS.steps, guidance=FLAGS.guidance,
                      rephrase=FLAGS.rephrase, expand_prompt=FLAGS.expand_prompt,
                      frames=FLAGS.frames, height=FLAGS.height, width=FLAGS.width,
                      rope=FLAGS.rope)
    result = evaluate(FLAGS.workdir, **kwargs)
    print(json.dumps(result))


if __name__ == "__main__":
    define_flags()
    app.run(main)
