"""Measures image and video prompting (`sora_jax/prompting.py`) on a dataset's held-out clips.

For each clip of the split, with its own caption unless said otherwise:

    animate          its first frame is the image
    extend_forward   the clip continued after its end to `frames` frames
    extend_backward  the clip continued before its start to `frames` frames
    loop             the clip closed into a loop (a transition of `frames` frames)
    connect          a transition of `frames` frames from clip i to clip i + 1, under clip i + 1's
                     caption
    edit             the clip redrawn at `strength` under its caption with another colour

and reports, as JSON:

    given_psnr          PSNR (dB, uint8 pixels) of the given frames against their reconstruction
                        in the decoded windows: how faithfully given pixels condition the DiT
    seam_ratio          mean absolute difference between the two frames of a seam (generated
                        next to given, and the wrap of a loop) over the mean difference between
                        consecutive frames away from seams, over all videos: 1 is a seam no
                        harder than the motion inside clips (target <= 1.5);
                        seam_differences: the mean difference at each seam position
    joined_difference   (loop, connect) mean difference between the two given frames the
                        transition joins (the clip's last and first, or A's last and B's first),
                        and even_step_ratio: that over the transition's steps (frames + 1) and
                        the interior difference, the seam ratio of a transition whose steps all
                        change the frame alike, as a cross-fade does. The steps of any transition
                        add up to at least the joined difference (triangle inequality), so a
                        transition with even steps cannot have a lower seam ratio than this
    adherence           the detector's scores of the generated frames against the caption
                        (`eval.detector.score`); for edit, the new colour, and
    trajectory_error    (edit) mean distance between the object's centroids in the edited and
                        original clips, as a fraction of the frame side, over frames coherent in
                        both; direction_kept: the detector's direction unchanged
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from sora_jax import paths

TASKS = ("animate", "extend_forward", "extend_backward", "loop", "connect", "edit")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of uint8 pixel arrays of one shape."""
    mse = np.mean(np.square(a.astype(np.float64) - b.astype(np.float64)))
    return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-10)))


def frame_differences(video: np.ndarray) -> np.ndarray:
    """Mean absolute difference between consecutive frames of uint8 [T, H, W, 3]: [T - 1]; entry
    i - 1 is the step into frame i."""
    v = video.astype(np.float32)
    return np.abs(v[1:] - v[:-1]).mean(axis=(1, 2, 3))


def seam_statistics(videos: np.ndarray, seams: list[int]) -> dict[str, float]:
    """Seam and interior frame differences of uint8 videos [B, T, ...] sharing seam positions; a
    seam at T is the wrap from the last frame to the first."""
    at_seams, inside = [], []  # at_seams[video][seam]
    for video in videos:
        steps = frame_differences(video)
        interior = np.ones(len(steps), bool)
        at_seams.append([])
        for s in seams:
            if s == video.shape[0]:
                at_seams[-1].append(frame_differences(video[[-1, 0]])[0])
            else:
                at_seams[-1].append(steps[s - 1])
                interior[s - 1] = False
        inside.extend(steps[interior])
    seam, typical = float(np.mean(at_seams)), float(np.mean(inside))
    return {"seam_difference": seam, "interior_difference": typical,
            "seam_ratio": seam / max(typical, 1e-6),
            "seam_differences": [float(d) for d in np.mean(at_seams, axis=0)]}


def joined_difference(ends: np.ndarray, starts: np.ndarray) -> float:
    """Mean difference between the frames a transition joins: uint8 [B, H, W, 3] each."""
    return float(np.abs(ends.astype(np.float32) - starts.astype(np.float32)).mean())


def _edited_caption(prompt: dict[str, Any], index: int) -> tuple[str, str]:
    from sora_jax.data import moving_shapes

    colours = [c for c in moving_shapes.COLOURS if c != prompt["colour"]]
    colour = colours[index % len(colours)]
    rng = np.random.default_rng(index)
    return colour, moving_shapes.rephrase(colour, prompt["shape"], prompt["direction"], rng,
                                          "train")


def evaluate_prompting(workdir, config, *, task: str, num_prompts=None, steps=None, guidance=None,
                       seed=0, checkpoint_step=None, split=None, frames=None, strength=0.7,
                       context_frames=None, pixel_guidance=None) -> dict:
    """Runs `task` (one of TASKS) on the split's clips and returns the measures above."""
    import jax
    import tqdm

    from sora_jax.data import pipeline
    from sora_jax.data.video_io import write_video
    from sora_jax.eval import detector
    from sora_jax.prompting import Prompter
    from sora_jax.training.checkpoint import restore_for_inference
    from sora_jax.training.experiment import Experiment, guidance_settings, to_uint8

    if task not in TASKS:
        raise ValueError(f"Unknown prompting task {task!r}; valid: {list(TASKS)}.")
    if task == "edit" and config.data.name != "moving_shapes":
        raise ValueError("The edit task rewrites moving_shapes captions; this dataset is "
                         f"{config.data.name!r}.")
    exp = Experiment(config)
    state, step = restore_for_inference(workdir, exp.abstract_state(), checkpoint_step)
    settings = guidance_settings(config.sampling, guidance=guidance,
                                 pixel_guidance=pixel_guidance)
    steps = steps or config.sampling.steps
    prompter = Prompter(exp, state.groups["dit"].inference_params, steps=steps, guidance=settings)
    split = split or config.data.eval_split
    num_prompts = num_prompts or config.eval.num_prompts
    prompts = pipeline.eval_prompts(**pipeline.data_kwargs(config.data), split=split,
                                    num=num_prompts + (task == "connect"))
    if len({p["video"].shape for p in prompts}) > 1:
        raise ValueError(f"The {split} split holds clips of many sizes; prompting is measured on "
                         "clips of one size (a dataset such as moving_shapes/f9_s16).")
    clips = np.stack([p["video"] for p in prompts]).astype(np.float32) / 127.5 - 1.0
    if task.startswith("extend") and frames is None:
        frames = 3 * config.data.frames - 2  # three clips' worth, sharing their seam frames
    batch_size = config.eval.batch_size
    outputs, given_pairs, generated_masks, seams, attributes = [], [], None, None, []
    for start in tqdm.tqdm(range(0, num_prompts, batch_size), desc=task, unit="batch"):
        index = list(range(start, min(start + batch_size, num_prompts)))
        index += [index[-1]] * (batch_size - len(index))  # one compiled shape
        rows = [prompts[i + (task == "connect")] for i in index]
        captions = [r["caption"] for r in rows]
        batch_attributes = rows
        if task == "edit":
            edited = [_edited_caption(r, i) for r, i in zip(rows, index)]
            captions = [c for _, c in edited]
            batch_attributes = [dict(r, colour=c) for r, (c, _) in zip(rows, edited)]
        text, mask = exp.text_encoder.encode(captions)
        rng = jax.random.fold_in(jax.random.key(seed), start)
        video = clips[index]
        if task == "animate":
            out = prompter.animate(video[:, 0], text, mask, rng)
        elif task.startswith("extend"):
            out = prompter.extend(video, text, mask, rng, frames=frames,
                                  direction=task.split("_")[1], context_frames=context_frames)
        elif task == "loop":
            out = prompter.loop(video, text, mask, rng, frames=frames)
        elif task == "connect":
            out = prompter.connect(video, clips[[i + 1 for i in index]], text, mask, rng,
                                   frames=frames)
        else:
            out = prompter.edit(video, text, mask, rng, strength=strength)
        keep = min(batch_size, num_prompts - start)
        outputs.append(to_uint8(out.video)[:keep])
        given_pairs.append([(to_uint8(g)[:keep], to_uint8(d)[:keep]) for g, d in out.given])
        generated_masks, seams = out.generated, out.seams
        attributes.extend(batch_attributes[:keep])
    videos = np.concatenate(outputs)

    result: dict[str, Any] = {
        "task": task, "workdir": os.fspath(paths.path(workdir)), "checkpoint_step": int(step),
        "split": split, "num_prompts": num_prompts, "sampling_steps": steps,
        "guidance": settings["guidance"], "pixel_guidance": settings["pixel_guidance"],
        "seed": seed, "frames": int(videos.shape[1]),
        "generated_frames": int(generated_masks.sum()), "seams": seams,
    }
    if task in ("loop", "connect"):  # how the next clip's first frame was given
        result["end_image"] = prompter.end_image
    if given_pairs[0]:
        given = np.concatenate([np.concatenate([g.reshape(-1) for g, _ in pairs])
                                for pairs in given_pairs])
        decoded = np.concatenate([np.concatenate([d.reshape(-1) for _, d in pairs])
                                  for pairs in given_pairs])
        result["given_psnr"] = psnr(given, decoded)
    if seams:
        result.update(seam_statistics(videos, seams))
    if task in ("loop", "connect"):
        ends = to_uint8(clips[:num_prompts, -1])
        starts = to_uint8(clips[1:num_prompts + 1, 0] if task == "connect"
                          else clips[:num_prompts, 0])
        joined = joined_difference(ends, starts)
        result["joined_difference"] = joined
        result["even_step_ratio"] = (joined / (result["generated_frames"] + 1)
                                     / max(result["interior_difference"], 1e-6))
    if task == "edit":
        result["strength"] = strength
        result.update(_edit_measures(videos, (clips[:num_prompts] + 1) * 127.5, attributes))
    else:
        result["adherence"] = detector.score(videos[:, generated_masks], attributes)
    out_dir = os.path.join(workdir, "eval")
    name = (f"step_{step:06d}_{split}_{task}_g{settings['guidance']:g}_s{steps}"
            f"_{videos.shape[1]}f")  # output frames: --frames (and the task) set them
    if settings["pixel_guidance"]:
        name += f"_pg{settings['pixel_guidance']:g}"
    write_video(os.path.join(out_dir, name + ".gif"), videos[:16])
    paths.write_text(os.path.join(out_dir, name + ".json"), json.dumps(result, indent=2))
    return result


def _edit_measures(edited: np.ndarray, original: np.ndarray, attributes) -> dict[str, Any]:
    from sora_jax.eval import detector

    original = np.clip(np.rint(original), 0, 255).astype(np.uint8)
    scores = detector.score(edited, attributes)
    errors, kept = [], []
    for e, o in zip(edited, original):
        de, do = detector.detect(e), detector.detect(o)
        both = de.coherent & do.coherent
        if both.any():
            distance = np.linalg.norm(de.centroids[both] - do.centroids[both], axis=-1)
            errors.append(float(distance.mean()) / min(e.shape[1:3]))
        kept.append(de.direction == do.direction)
    return {"adherence": scores, "new_colour_accuracy": scores["colour_accuracy"],
            "trajectory_error": float(np.mean(errors)) if errors else None,
            "trajectory_measured": len(errors), "direction_kept": float(np.mean(kept))}
