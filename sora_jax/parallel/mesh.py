"""Device meshes and logical-axis sharding rules.

Parallelism is declared in the config: `config.mesh` gives the size of each mesh axis
(`data`, `fsdp`, `tensor`, `sequence`; -1 takes the remaining devices) and `config.sharding_rules`
maps the logical axis names that parameters and activations carry to those mesh axes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "sequence")

# Logical axis -> mesh axes. Parameters are ZeRO-3 sharded over `fsdp`, heads and MLP over `tensor`;
# activations split the batch over `data` x `fsdp` and tokens over `sequence`.
DEFAULT_RULES = (
    ("act_batch", ("data", "fsdp")),
    ("act_length", "sequence"),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("head_dim", None),
    ("vocab", None),
    ("layers", None),
    ("patch", None),
    ("text_embed", None),
)


def mesh_shape(axis_sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolves a {axis: size} mapping (one size may be -1) to a shape over `MESH_AXES`."""
    unknown = set(axis_sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"Unknown mesh axes {sorted(unknown)}; valid axes are {MESH_AXES}.")
    sizes = [int(axis_sizes.get(name, 1)) for name in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"At most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}.")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"Mesh axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}.")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(
                f"Mesh {dict(zip(MESH_AXES, sizes))} does not divide {num_devices} devices.")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"Mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but "
            f"{num_devices} are available; set one axis to -1 to take the rest.")
    return tuple(sizes)


def make_mesh(axis_sizes: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
    """Builds a mesh over all (or the given) devices with Auto axis types.

    Auto axes let XLA propagate shardings through ordinary matmuls; the installed jax defaults to
    Explicit axes, under which unannotated sharded matmuls fail with ShardingTypeError.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(axis_sizes, len(devices))
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if len(devices) == jax.device_count():
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def rules_from_config(rules: Sequence[Sequence[Any]]) -> tuple[tuple[str, Any], ...]:
    """Normalises config rules (lists from ConfigDict) to the tuple form flax expects."""
    out = []
    for rule in rules:
        if len(rule) != 2:
            raise ValueError(f"A sharding rule is (logical_name, mesh_axes), got {rule!r}.")
        name, axes = rule
        if isinstance(axes, (list, tuple)):
            axes = tuple(axes)
            bad = [a for a in axes if a not in MESH_AXES]
        else:
            bad = [axes] if axes is not None and axes not in MESH_AXES else []
        if bad:
            raise ValueError(f"Sharding rule {rule!r} names unknown mesh axes {bad}; valid: {MESH_AXES}.")
        out.append((str(name), axes))
    return tuple(out)


def logical_to_sharding(logical_specs: Any, mesh: Mesh, rules) -> Any:
    """Maps a pytree of logical PartitionSpecs to NamedShardings on `mesh`."""
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, nn.logical_to_mesh_axes(spec, rules)),
        logical_specs,
        is_leaf=lambda x: isinstance(x, P),
    )


def batch_sharding(mesh: Mesh, rules, ndim: int) -> NamedSharding:
    """Sharding of a batch array: leading axis over the batch axes, the rest replicated."""
    spec = nn.logical_to_mesh_axes(("act_batch",) + (None,) * (ndim - 1), rules)
    return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_axes(rules) -> tuple[str, ...]:
    """The mesh axes the batch is split over, by the logical-axis rules."""
    spec = nn.logical_to_mesh_axes(("act_batch",), rules)[0]
    return spec if isinstance(spec, tuple) else ((spec,) if spec else ())


def batch_axis_size(mesh: Mesh, rules) -> int:
    """How many ways the batch is split: the global batch must be a multiple of this."""
    return math.prod(mesh.shape[a] for a in batch_axes(rules))


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Starts jax's multi-process runtime; call it before anything touches jax's devices.

    Arguments left None are discovered by jax where it can: Cloud TPU pods, SLURM, Open MPI and
    Kubernetes set everything, and JAX_COORDINATOR_ADDRESS gives the address. Several processes
    on one machine, or GPU hosts without a scheduler, give all three.
    """
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes={num_processes}: give the number of processes (>= 1).")
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id} is not in [0, num_processes={num_processes}): "
                         "number the processes 0, 1, ..., num_processes - 1.")
    # CPU processes need a library for collectives across processes: gloo (over TCP), unless
    # another was chosen (JAX_CPU_COLLECTIVES_IMPLEMENTATION=mpi). Only the CPU client reads it.
    on_cpu = (jax.config.jax_platforms or "cpu").split(",")[0] == "cpu"
    if (on_cpu and num_processes != 1
            and jax.config.jax_cpu_collectives_implementation in (None, "gloo")):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
