r"""Evaluates a trained workdir and prints one JSON object.

  python -m sora_jax.evaluate --workdir=DIR [--num_prompts N]

The task comes from the workdir's saved config. For text-to-video, videos are generated for
held-out prompts (attribute combinations and phrasings never seen in training) and an analytic
detector reads colour, shape, motion direction and per-frame coherence from their pixels; the same
detector's scores on the real videos of those prompts are reported beside them as its reference.
"""

import json
import os

from absl import app, flags, logging

FLAGS = flags.FLAGS


def evaluate_text_to_video(workdir, config, *, num_prompts=None, steps=None, guidance=None, seed=0,
                           checkpoint_step=None, split=None) -> dict:
    """Prompt adherence of generated videos on the config's held-out split."""
    import jax
    import numpy as np
    import tqdm

    from sora_jax.data import pipeline
    from sora_jax.data.video_io import write_video
    from sora_jax.eval import detector
    from sora_jax.training.checkpoint import restore_for_inference
    from sora_jax.training.experiment import Experiment, to_uint8

    exp = Experiment(config)
    state, step = restore_for_inference(workdir, exp.abstract_state(), checkpoint_step)
    steps = steps or config.sampling.steps
    guidance = config.sampling.guidance if guidance is None else guidance
    num_prompts = num_prompts or config.eval.num_prompts
    data_kw = dict(name=config.data.name, builder_config=config.data.builder_config,
                   data_dir=config.data.data_dir)
    split = split or config.data.eval_split
    prompts = pipeline.eval_prompts(**data_kw, split=split, num=num_prompts)
    if len(prompts) < num_prompts:
        logging.warning("Only %d prompts in split %r.", len(prompts), split)
    sampler = exp.make_sampler(steps=steps, guidance=guidance)
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
    reference = detector.score(np.stack([p["video"] for p in prompts]), prompts) \
        if "video" in prompts[0] else None
    out_dir = os.path.join(workdir, "eval")
    name = f"step_{step:06d}_{split}_g{guidance:g}_s{steps}"
    write_video(os.path.join(out_dir, name + ".gif"), videos[:16])
    result = {
        "task": config.task,
        "workdir": os.path.abspath(workdir),
        "checkpoint_step": int(step),
        "split": split,
        "num_prompts": len(prompts),
        "sampling_steps": steps,
        "guidance": guidance,
        "seed": seed,
        **generated,
    }
    if reference is not None:
        result["detector_on_real_videos"] = reference
    with open(os.path.join(out_dir, name + ".json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


EVALUATORS = {"text_to_video": evaluate_text_to_video}


def evaluate(workdir: str, **kwargs) -> dict:
    from sora_jax.training.loop import load_config

    config = load_config(workdir)
    if config.task not in EVALUATORS:
        raise ValueError(f"No evaluation for task {config.task!r}; known: {sorted(EVALUATORS)}.")
    return EVALUATORS[config.task](workdir, config, **kwargs)


def define_flags():
    """Command-line flags, defined only when run as a program so the module imports cleanly."""
    flags.DEFINE_string("workdir", None, "A training workdir.")
    flags.DEFINE_integer("num_prompts", None, "Held-out prompts (default: config.eval).")
    flags.DEFINE_integer("steps", None, "Sampling steps (default: config.sampling.steps).")
    flags.DEFINE_float("guidance", None, "Guidance scale (default: config.sampling).")
    flags.DEFINE_integer("seed", 0, "Random seed.")
    flags.DEFINE_string("split", None, "Dataset split (default: config.data.eval_split, held "
                                 "out); e.g. 'validation' to tune sampling settings without it.")
    flags.DEFINE_integer("checkpoint_step", None, "Checkpoint step (default: latest).")
    flags.mark_flags_as_required(["workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    result = evaluate(FLAGS.workdir, num_prompts=FLAGS.num_prompts, steps=FLAGS.steps,
                      guidance=FLAGS.guidance, seed=FLAGS.seed,
                      checkpoint_step=FLAGS.checkpoint_step, split=FLAGS.split)
    print(json.dumps(result))


if __name__ == "__main__":
    define_flags()
    app.run(main)
