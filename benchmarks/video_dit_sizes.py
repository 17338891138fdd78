r"""The video DiT sizes of configs/video_dit.py on their slices; prints JSON, compiles nothing.

  python benchmarks/video_dit_sizes.py [--sizes=100M,1B,3B,10B]

For each size: parameters (counted from the abstract state), forward FLOPs per nominal clip
(`DiT.flops_per_example`; a training step costs about 3x), tokens per clip, the slice and the mesh
config.mesh resolves to there, and sora_jax/training/memory.py's per-device estimate on that mesh
for the configured remat policy and for each other one. Runs on one CPU device: the estimate
places the config's logical shardings on the slice's mesh without building it.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_SIZES = flags.DEFINE_list("sizes", None, "Sizes (default: all of configs/video_dit.SIZES).")


def main(argv):
    del argv
    import jax

    from configs import video_dit
    from sora_jax.models.dit import REMAT_POLICIES
    from sora_jax.parallel.mesh import MESH_AXES, mesh_shape
    from sora_jax.training import memory
    from sora_jax.training.experiment import Experiment

    rows = []
    for name in _SIZES.value or list(video_dit.SIZES):
        size = video_dit.SIZES[name]
        config = video_dit.get_config(name)
        slice_mesh = dict(zip(MESH_AXES, mesh_shape(config.mesh, size["chips"])))
        config.mesh = {axis: 1 for axis in MESH_AXES}
        configured = config.model.remat_policy
        estimates = {}
        for policy in REMAT_POLICIES:
            config.model.remat_policy = policy
            exp = Experiment(config, jax.devices()[:1])
            state = exp.abstract_state()
            estimates[policy] = memory.estimate(exp, slice_mesh, abstract_state=state)
        config.model.remat_policy = configured
        e = estimates[configured]
        model = exp.model
        rows.append({
            "size": name,
            "width": model.width, "depth": model.depth, "num_heads": model.num_heads,
            "params": sum(x.size for x in jax.tree.leaves(state.groups["dit"].params)),
            "clip": list(size["clip"]),
            "latents": list(exp.latent_shape),
            "tokens_per_clip": exp.tokens_per_example(),
            "forward_flops_per_clip": model.flops_per_example(exp.latent_shape[:3],
                                                              config.text.max_length),
            "slice": size["slice"], "chips": size["chips"], "hbm_gb_per_chip": size["hbm_gb"],
            "mesh": slice_mesh,
            "global_rows": exp.batch_shapes()["tokens"].shape[0],
            "remat_policy": configured, "scan_layers": model.scan_layers,
            "estimate_gib": {k: round(v / memory.GiB, 2) for k, v in e.items()
                             if k in ("params", "ema_params", "opt_state", "gradients", "batch",
                                      "activations", "total")},
            "rows_per_device": e["rows_per_device"], "tokens_per_device": e["tokens_per_device"],
            "total_gib_by_policy": {p: round(v["total"] / memory.GiB, 1)
                                    for p, v in estimates.items()},
        })
    print(json.dumps({"benchmark": "video_dit_sizes", "sizes": rows}))


if __name__ == "__main__":
    app.run(main)
