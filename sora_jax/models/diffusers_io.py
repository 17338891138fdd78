"""Reading diffusers-layout model folders into flax parameters, without torch.

A diffusers folder holds config.json and the weights: diffusion_pytorch_model.safetensors, or shards
listed in diffusion_pytorch_model.safetensors.index.json. Flax modules named after diffusers' ones,
a list index written `_3` for `.3`, map one to one onto the checkpoint's tensor names; torch
kernels [out, in, *k] become flax's [*k, in, out]. Model modules supply what is their own (extra
name rules, tensor shapes that differ in more than the kernel layout) and call `read_params`.
"""

from __future__ import annotations

import functools
import json
import pathlib
from collections.abc import Callable, Collection, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import safe_open

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"

ParamPath = tuple[str, ...]
Shape = tuple[int, ...]


def read_config(folder: pathlib.Path, class_name: str) -> dict:
    """The folder's config.json; FileNotFoundError without the folder or the file, ValueError when it
    describes another class than `class_name`."""
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder} is not a folder. Pass the folder of a diffusers {class_name} (config.json and "
            f"{WEIGHTS_NAME}), such as the vae/ subfolder of a diffusers pipeline.")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} is missing: a diffusers {class_name} folder needs the "
                                f"model's config.json next to its weights.")
    config = json.loads(config_file.read_text())
    if config.get("_class_name", class_name) != class_name:
        raise ValueError(f"{config_file} describes {config['_class_name']}, not {class_name}.")
    return config


def weight_files(folder: pathlib.Path) -> list[pathlib.Path]:
    """The folder's safetensors: the single weights file, or the shards its index lists."""
    if (folder / WEIGHTS_NAME).is_file():
        return [folder / WEIGHTS_NAME]
    index = folder / INDEX_NAME
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [name for name in shards if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that are not in {folder}: {missing}. "
                                    f"Download every shard next to the index.")
        return [folder / name for name in shards]
    found = sorted(p.name for p in folder.iterdir())
    raise FileNotFoundError(
        f"{folder} has neither {WEIGHTS_NAME} nor {INDEX_NAME} (found: {found}). Fetch the model's "
        f"safetensors weights into it, or write them with diffusers' `save_pretrained(folder)` (the "
        f"default safe_serialization=True); PyTorch .bin checkpoints are not read.")


def tensor_shapes(files: Sequence[pathlib.Path]) -> dict[str, tuple[pathlib.Path, Shape]]:
    """Tensor name -> (file, shape) for every tensor of the safetensors files, read from headers."""
    shapes = {}
    for file in files:
        with safe_open(str(file), framework="np") as f:
            shapes.update({name: (file, tuple(f.get_slice(name).get_shape())) for name in f.keys()})
    return shapes


def check_tensors(expected: dict[str, Shape], found: dict[str, tuple[pathlib.Path, Shape]],
                  folder: pathlib.Path, class_name: str) -> None:
    """Raises ValueError naming the tensors that are missing, of the wrong shape or unexpected, with
    `expected` the names and shapes the config implies and `found` as `tensor_shapes` gives."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [f"{name} in {found[name][0].name} has shape {found[name][1]} (expected {shape})"
             for name, shape in expected.items() if name in found and found[name][1] != shape]
    problems = [f"{what}: {_listing(entries)}" for what, entries in
                (("Missing tensors", missing), ("Tensors of the wrong shape", wrong),
                 ("Unexpected tensors", unexpected)) if entries]
    if problems:
        raise ValueError(
            f"The checkpoint in {folder} does not match its config.json.\n  " + "\n  ".join(problems)
            + f"\nThe folder's config.json and weights must come from the same {class_name}; "
            "re-download or re-save them together.")


def _listing(entries: Sequence[str], limit: int = 10) -> str:
    more = f"; and {len(entries) - limit} more" if len(entries) > limit else ""
    return "; ".join(entries[:limit]) + more


def read_tensors(files: Sequence[pathlib.Path], names: Collection[str]) -> dict[str, np.ndarray]:
    """The tensors `names` of the safetensors files as numpy arrays, bfloat16 ones included."""
    tensors = {}
    for file in files:
        with safe_open(str(file), framework="np") as f:
            wanted = [name for name in f.keys() if name in names]
            bfloat16 = {name for name in wanted if f.get_slice(name).get_dtype() == "BF16"}
            tensors.update((name, f.get_tensor(name)) for name in wanted if name not in bfloat16)
        if bfloat16:
            tensors.update(_read_bfloat16(file, bfloat16))
    return tensors


def _read_bfloat16(file: pathlib.Path, names: set[str]) -> dict[str, np.ndarray]:
    """numpy has no bfloat16 of its own, so safetensors' numpy API may not return these tensors: they
    are read from the file's layout (an 8-byte header size, a JSON header, then the raw data)."""
    data = np.memmap(file, np.uint8, mode="r")
    header_size = int.from_bytes(data[:8].tobytes(), "little")
    header = json.loads(data[8:8 + header_size].tobytes())
    tensors = {}
    for name in names:
        start, stop = (8 + header_size + offset for offset in header[name]["data_offsets"])
        tensors[name] = np.array(data[start:stop]).view(jnp.bfloat16).reshape(header[name]["shape"])
    return tensors


def torch_name(path: ParamPath) -> str:
    """Flax parameter path -> diffusers tensor name, e.g. ('encoder', 'down_blocks_0', 'norm1',
    'scale') -> 'encoder.down_blocks.0.norm1.weight' (kernels and norm scales are torch weights)."""
    *modules, leaf = path
    names = []
    for module in modules:
        stem, _, index = module.rpartition("_")
        names.append(f"{stem}.{index}" if index.isdigit() else module)
    return ".".join(names + [{"kernel": "weight", "scale": "weight"}.get(leaf, leaf)])


def torch_shape(path: ParamPath, shape: Shape) -> Shape:
    """The checkpoint shape of a flax parameter: kernels [*k, in, out] are torch's [out, in, *k]."""
    return (shape[-1], shape[-2], *shape[:-2]) if path[-1] == "kernel" else shape


def to_flax(array: np.ndarray, leaf: str, shape: Shape, dtype: Any) -> jax.Array:
    """A checkpoint tensor as the flax parameter `leaf` of `shape`: kernels transposed from torch's
    layout, other tensors reshaped (dropping unit axes), cast to `dtype`."""
    if leaf == "kernel":
        array = array.transpose(*range(2, array.ndim), 1, 0)
    return jnp.asarray(array.reshape(shape), dtype)


@functools.cache
def param_shapes(net: Any, input_shape: Shape) -> dict[ParamPath, Shape]:
    """Flax parameter path -> shape of `net`, from tracing its init on an input of `input_shape`."""
    sample = jax.ShapeDtypeStruct(input_shape, jnp.float32)
    params = jax.eval_shape(net.init, jax.random.key(0), sample)["params"]
    return {path: leaf.shape for path, leaf in traverse_util.flatten_dict(params).items()}


def read_params(folder: pathlib.Path, shapes: dict[ParamPath, Shape], class_name: str, dtype: Any,
                name_of: Callable[[ParamPath], str] = torch_name,
                shape_of: Callable[[ParamPath, Shape], Shape] = torch_shape) -> Any:
    """The flax parameters of `shapes` (path -> shape) from the folder's weights, as `dtype` arrays,
    after checking that the checkpoint holds exactly the tensors `name_of` names, of the shapes
    `shape_of` gives."""
    names = {path: name_of(path) for path in shapes}
    files = weight_files(folder)
    check_tensors({names[path]: shape_of(path, shape) for path, shape in shapes.items()},
                  tensor_shapes(files), folder, class_name)
    tensors = read_tensors(files, set(names.values()))
    return traverse_util.unflatten_dict(
        {path: to_flax(tensors[names[path]], path[-1], shape, dtype) for path, shape in shapes.items()})
