"""Hugging Face Llama checkpoints <-> ctelm_jax decoder parameters, both ways.

A checkpoint folder is `config.json` plus `model.safetensors` or shards listed in `model.safetensors.index.json`.
Weights are read from safetensors only: a folder holding only PyTorch pickles is refused (`weight_files`), never
unpickled, since loading a pickle can run any code it carries.
Tensors travel as a flat dict {HF name: numpy array (PyTorch layout)}; `decoder_from_hf` / `decoder_to_hf`
translate that dict to and from a `Llama` module (one rename and, for kernels, one transpose). At scale,
`read_decoder` reads a folder straight into sharded arrays instead: each process reads only the slices of each tensor
that its devices hold (`SafetensorsFolder`), so no host ever holds the whole checkpoint.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from ctelm_jax.errors import UserError
from ctelm_jax.models.llama import Llama, LlamaConfig
from ctelm_jax.models.lora import LoRAParam

Tensors = dict[str, np.ndarray]
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")  # torch.save / pickle files, never loaded


class CheckpointError(UserError):
    """A checkpoint is missing, malformed, or does not fit the model it is loaded into (entry points print it as one
    line)."""


def read_config(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    """Reads `config.json` from a checkpoint folder."""
    path = Path(ckpt_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: no config.json; a Hugging Face checkpoint folder needs one beside its weights.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}).") from e


def _refuse_pickles(ckpt_dir: Path) -> None:
    """Refuses a folder without safetensors that holds PyTorch pickles: a UserError saying how to convert it."""
    pickles = sorted(p.name for p in ckpt_dir.iterdir() if p.suffix in PICKLE_SUFFIXES) if ckpt_dir.is_dir() else []
    if pickles:
        raise UserError(
            f"{ckpt_dir} holds its weights only as PyTorch pickles ({', '.join(pickles[:3])}); ctelm_jax reads "
            "safetensors and GGUF only and never unpickles a file (loading one can run any code it carries). If you "
            "trust the folder, convert it once with transformers: `AutoModel.from_pretrained(folder)"
            ".save_pretrained(folder, safe_serialization=True)` (AutoModelForCausalLM for a decoder), then use it.")


def weight_files(ckpt_dir: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint folder (one file, or the shards its index lists), checked to exist; a
    folder of pickles only is refused with a UserError saying how to convert it."""
    ckpt_dir = Path(ckpt_dir)
    index = ckpt_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: malformed index ({e}); expected a 'weight_map' of tensor -> shard.") from e
        names = sorted(set(weight_map.values()))
    elif (ckpt_dir / SINGLE_FILE).is_file():
        names = [SINGLE_FILE]
    else:
        _refuse_pickles(ckpt_dir)
        raise CheckpointError(f"{ckpt_dir}: neither {SINGLE_FILE} nor {INDEX_FILE}; is this a Hugging Face checkpoint?")
    missing = [n for n in names if not (ckpt_dir / n).is_file()]
    if missing:
        raise CheckpointError(f"{ckpt_dir / missing[0]}: shard listed in {INDEX_FILE} is missing; re-download or "
                              "re-export it.")
    return [ckpt_dir / n for n in names]


def read_tensors(ckpt_dir: str | os.PathLike) -> Tensors:
    """Reads every tensor of a safetensors checkpoint folder (single file or sharded with an index)."""
    tensors: Tensors = {}
    for shard in weight_files(ckpt_dir):
        try:
            tensors.update(load_file(str(shard)))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{shard}: unreadable safetensors file ({e}).") from e
    return tensors


class SafetensorsFolder:
    """A safetensors checkpoint folder read by slices: names and shapes come from the file headers; `read` opens the
    tensor's file, copies one slice out and closes it, so no mapping of a whole file stays resident."""

    def __init__(self, ckpt_dir: str | os.PathLike):
        self.files: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for shard in weight_files(ckpt_dir):
            try:
                with safe_open(str(shard), framework="numpy") as f:
                    for name in f.keys():
                        self.files[name] = shard
                        self.shapes[name] = tuple(f.get_slice(name).get_shape())
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{shard}: unreadable safetensors file ({e}).") from e

    def shape(self, name: str) -> tuple[int, ...] | None:
        """The tensor's shape, None when the folder has no such tensor."""
        return self.shapes.get(name)

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """One slice of a tensor (PyTorch layout), read from disk."""
        with safe_open(str(self.files[name]), framework="numpy") as f:
            return f.get_slice(name)[index]


def write_tensors(tensors: Tensors, out_dir: str | os.PathLike, max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Writes tensors as safetensors, sharded with an index once they exceed `max_shard_bytes`; returns file names."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[Tensors] = [{}]
    size = 0
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        if shards[-1] and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / SINGLE_FILE), metadata=meta)
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, str(out_dir / name), metadata=meta)
        weight_map.update({k: name for k in shard})
    total = sum(a.nbytes for a in tensors.values())
    (out_dir / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return names + [INDEX_FILE]


def _hf_name(path: tuple[Any, ...]) -> tuple[str, bool]:
    """The HF tensor name for a base-parameter path (layer index as '{i}' when stacked) and whether it is transposed."""
    if path == ("embed_tokens",):
        return "model.embed_tokens.weight", False
    if path == ("lm_head",):
        return "lm_head.weight", True
    if path == ("norm", "weight"):
        return "model.norm.weight", False
    if path[0] != "layers":
        raise KeyError(f"no Hugging Face name for parameter {path}")
    rest = [str(p) for p in path[1:] if p != "base"]
    layer = "{i}" if not isinstance(path[1], int) else rest.pop(0)
    transpose = rest[-1] == "kernel"
    rest[-1] = "weight" if transpose else rest[-1]
    return f"model.layers.{layer}." + ".".join(rest), transpose


def _base_params(model: Llama) -> Iterable[tuple[tuple[Any, ...], nnx.Variable]]:
    """(path, variable) for every decoder parameter that is not a LoRA factor."""
    state = nnx.state(model, nnx.All(nnx.Param, nnx.Not(LoRAParam)))
    return nnx.to_flat_state(state)


def _sources(path: tuple[Any, ...], shape: tuple[int, ...], num_layers: int,
             shape_of: Callable[[str], tuple[int, ...] | None], source: str) -> tuple[list[str], bool, bool]:
    """(HF names, transposed, stacked on a leading layer axis) of the base parameter `path` of shape `shape`; a
    CheckpointError when one of the tensors is missing or has another shape."""
    name, transpose = _hf_name(path)
    stacked = "{i}" in name
    names = [name.format(i=i) for i in range(num_layers)] if stacked else [name]
    per_tensor = tuple(shape[1:] if stacked else shape)
    want = per_tensor[::-1] if transpose else per_tensor
    for n in names:
        got = shape_of(n)
        if got is None:
            raise CheckpointError(f"{source}: tensor {n!r} is missing (needed for parameter {'/'.join(map(str, path))}).")
        if tuple(got) != want:
            raise CheckpointError(f"{source}: tensor {n!r} has shape {tuple(got)}, but the config expects {want}; "
                                  "does config.json belong to these weights?")
    return names, transpose, stacked


def decoder_from_hf(model: Llama, tensors: Tensors, source: str = "checkpoint") -> None:
    """Copies HF-named tensors into `model` in place, checking every name and shape; LoRA factors are left alone."""
    cfg = model.config
    dtype = jnp.dtype(cfg.param_dtype)
    updates = []
    for path, var in _base_params(model):
        names, transpose, stacked = _sources(path, tuple(var.shape), cfg.num_layers,
                                             lambda n: tensors[n].shape if n in tensors else None, source)
        arrays = [tensors[n].T if transpose else tensors[n] for n in names]
        updates.append((path, jnp.asarray(np.stack(arrays) if stacked else arrays[0], dtype)))
    for path, value in updates:
        node = model
        for p in path[:-1]:
            node = node[p] if isinstance(p, int) else getattr(node, p)
        getattr(node, path[-1])[...] = value


def _slice_reader(folder: SafetensorsFolder, names: list[str], transpose: bool, stacked: bool,
                  dtype: jnp.dtype) -> Callable[[tuple[slice, ...]], np.ndarray]:
    """The `make_array_from_callback` callback of one parameter: the block at an index of our layout, read from the
    HF tensors (layer slice -> which tensors; other slices reversed for a transposed kernel). Devices that hold the
    same block (replicas) share one read."""
    blocks: dict[tuple, np.ndarray] = {}

    def read(index: tuple[slice, ...]) -> np.ndarray:
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in blocks:
            layers, rest = (names[index[0]], index[1:]) if stacked else (names, index)
            parts = [folder.read(n, rest[::-1] if transpose else rest) for n in layers]
            parts = [p.T if transpose else p for p in parts]
            blocks[key] = (np.stack(parts) if stacked else parts[0]).astype(dtype, copy=False)
        return blocks[key]

    return read


def read_decoder(ckpt_dir: str | os.PathLike, model: Llama,
                 shardings: Mapping[tuple[Any, ...], jax.sharding.Sharding]) -> dict[tuple[Any, ...], jax.Array]:
    """The decoder's base parameters {path in `nnx.state(model)`: array} read from a HF folder straight onto
    `shardings` (by path): each array is assembled from the slices this process's devices hold, so a process reads
    only those, and holds at most one parameter's local slices on the host. `model` may be abstract (eval_shape)."""
    folder = SafetensorsFolder(ckpt_dir)
    cfg = model.config
    dtype = jnp.dtype(cfg.param_dtype)
    out = {}
    for path, var in _base_params(model):
        shape = tuple(var.shape)
        names, transpose, stacked = _sources(path, shape, cfg.num_layers, folder.shape, str(ckpt_dir))
        out[path] = jax.make_array_from_callback(shape, shardings[path],
                                                 _slice_reader(folder, names, transpose, stacked, dtype), dtype)
    return out


def decoder_to_hf(model: Llama, merge_lora: bool = True) -> Tensors:
    """The decoder's parameters as HF-named numpy tensors in `param_dtype` (also when the frozen base is held in
    another dtype, `train.precision`); LoRA updates merged into their base kernels if asked."""
    cfg = model.config
    dtype = np.dtype(jnp.dtype(cfg.param_dtype))
    flat = {path: np.asarray(var[...]).astype(dtype, copy=False) for path, var in _base_params(model)}
    if merge_lora and cfg.lora_rank > 0:
        lora = dict(nnx.to_flat_state(nnx.state(model, LoRAParam)))
        for path in {p[:-1] for p in lora}:
            a, b = np.asarray(lora[path + ("a",)][...]), np.asarray(lora[path + ("b",)][...])
            delta = (cfg.lora_alpha / cfg.lora_rank) * np.matmul(a, b)
            kernel = path[:-1] + ("base", "kernel")
            flat[kernel] = (flat[kernel].astype(np.float32) + delta).astype(flat[kernel].dtype)
    out: Tensors = {}
    for path, value in flat.items():
        name, transpose = _hf_name(path)
        if "{i}" in name:
            for i in range(cfg.num_layers):
                out[name.format(i=i)] = value[i].T if transpose else value[i]
        else:
            out[name] = value.T if transpose else value
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def lora_to_peft(model: Llama) -> Tensors:
    """LoRA factors as a PEFT `adapter_model.safetensors` dict (lora_A: (r, in), lora_B: (out, r))."""
    out: Tensors = {}
    for path, var in nnx.to_flat_state(nnx.state(model, LoRAParam)):
        *mod, factor = path
        name, _ = _hf_name(tuple(mod[:-1]) + ("kernel",))
        value = np.asarray(var[...]).astype(jnp.dtype(model.config.param_dtype), copy=False)
        names = [(name.format(i=i), value[i]) for i in range(model.config.num_layers)] if "{i}" in name else [(name, value)]
        for n, v in names:
            key = "base_model.model." + re.sub(r"\.weight$", "", n) + (".lora_A.weight" if factor == "a" else ".lora_B.weight")
            out[key] = np.ascontiguousarray(v.T)
    return out


def load_decoder(ckpt_dir: str | os.PathLike, rngs: nnx.Rngs | None = None, **overrides: Any) -> Llama:
    """Builds a `Llama` from a HF checkpoint folder; `overrides` set non-architecture fields (dtype, LoRA, scan)."""
    cfg = LlamaConfig.from_hf_dict(read_config(ckpt_dir), **overrides)
    model = Llama(cfg, rngs=rngs or nnx.Rngs(0))
    decoder_from_hf(model, read_tensors(ckpt_dir), source=str(ckpt_dir))
    return model
