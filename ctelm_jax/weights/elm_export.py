"""ELM folders: a Hugging Face Llama folder whose state dict also holds the adapter, both ways.

The layout is OpenELM's: `model.safetensors` (sharded with an index above a size limit) holds the decoder under
`LlamaForCausalLM` names plus `adapter.0.weight/bias` and `adapter.2.weight/bias` (the Linear -> ReLU -> Linear
adapter as a `torch.nn.Sequential`, PyTorch (out, in) layout); `config.json` is the Llama config plus
`dim_embed_domain`, `dim_adapter_hidden`, `placeholder_token(_id)` and the encoder's name. An embedding-prediction head
(`models.embed_head`) is stored as `embed_head.weight/bias` (PyTorch layout) with its loss weight as
`embed_pred_weight` in config.json. An adapter that emits k > 1 soft tokens per embedding (`models.adapter`) has
`adapter.2` of k * hidden_size outputs (token j: rows [j * hidden_size, (j + 1) * hidden_size)) and
`tokens_per_embedding: k` in config.json (absent: 1, so a k = 1 folder is OpenELM's). LoRA is either merged
into the base weights or kept beside them as a PEFT adapter (`adapter_config.json`, `adapter_model.safetensors`).
Tokenizer files (with chat template and placeholder token) and `generation_config.json` complete the folder.

The placeholder's id has a row in the exported embedding table, so code that looks every input id up before splicing
the adapter's output over the placeholders (OpenELM's `LlamaForEmbeddingLM`, plain Hugging Face code) runs. A reserved
token of the decoder (Llama-3's) has one already. A placeholder added to the tokenizer (SmolLM2) has the id
`vocab_size`: the export appends a zero row to `embed_tokens` (and to an untied `lm_head`), sets `vocab_size + 1` and
`placeholder_row: true` in config.json (`import_elm` drops the row again). Every output on the decoder's vocabulary is
unchanged: the row's input embedding is always overwritten by the splice, and its only output is one extra logit,
exactly 0 (a zero row of the head, tied or not); the head cannot be given a row whose logit loses to every real one
for every hidden state (there is no bias), so `generation_config.json` lists the placeholder in `suppress_tokens`, as
ctelm_jax's own decoding bans it, and `generate` never emits it.

Folders are written atomically on a local disk: into a hidden temporary sibling, renamed into place when complete.
A remote folder (gs://) has no atomic rename; `staged_dir` says what is done there instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from ctelm_jax import fs
from ctelm_jax.errors import UserError, is_disk_full
from ctelm_jax.models.adapter import Adapter, folded_input_layer
from ctelm_jax.models.elm import ELM
from ctelm_jax.models.embed_head import EmbedHead
from ctelm_jax.models.llama import Llama, LlamaConfig
from ctelm_jax.models.lora import LoRAParam
from ctelm_jax.weights.hf import (
    CheckpointError, Tensors, decoder_from_hf, decoder_to_hf, lora_to_peft, read_config, read_tensors, write_tensors,
)
from ctelm_jax.weights.tokenizer import Tokenizer

ADAPTER_LAYERS = {"0": "fc_in", "2": "fc_out"}  # index in the torch Sequential -> Adapter attribute
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
GENERATION_CONFIG = "generation_config.json"
PEFT_PREFIX = "base_model.model."
CONFIG = "config.json"  # written last into a remote folder: a folder holding it is complete
PLACEHOLDER_ROW = "placeholder_row"  # config.json: the table holds an appended row for the placeholder (module doc)
TOKENS_PER_EMBEDDING = "tokens_per_embedding"  # config.json: k soft tokens per embedding (absent: 1)
VOCAB_TABLES = ("model.embed_tokens.weight", "lm_head.weight")  # HF tensors with one row per vocabulary id
LORA_MODES = ("merge", "peft")
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9


def adapter_to_hf(adapter: Adapter, dtype: np.dtype | None = None) -> Tensors:
    """The adapter as `adapter.{0,2}.{weight,bias}` numpy tensors (PyTorch (out, in) layout) in `dtype` (default: its
    kernel's), its input standardisation folded into `adapter.0` so that the file is the plain Linear -> ReLU ->
    Linear of OpenELM."""
    dtype = np.asarray(adapter.fc_in.kernel[...]).dtype if dtype is None else dtype
    out: Tensors = {}
    for index, attr in ADAPTER_LAYERS.items():
        dense = getattr(adapter, attr)
        kernel, bias = folded_input_layer(adapter) if attr == "fc_in" else (dense.kernel[...], dense.bias[...])
        out[f"adapter.{index}.weight"] = np.ascontiguousarray(np.asarray(kernel).T.astype(dtype))
        out[f"adapter.{index}.bias"] = np.asarray(bias).astype(dtype)
    return out


def adapter_from_hf(adapter: Adapter, tensors: Tensors, source: str = "checkpoint") -> None:
    """Copies `adapter.*` tensors into `adapter` in place, checking every name and shape."""
    updates = []
    for index, attr in ADAPTER_LAYERS.items():
        dense = getattr(adapter, attr)
        for leaf, transpose in (("weight", True), ("bias", False)):
            name = f"adapter.{index}.{leaf}"
            if name not in tensors:
                raise CheckpointError(f"{source}: tensor {name!r} is missing; an ELM checkpoint stores its adapter as "
                                      "adapter.0.weight/bias and adapter.2.weight/bias beside the decoder.")
            var = dense.kernel if transpose else dense.bias
            value = tensors[name].T if transpose else tensors[name]
            if value.shape != var[...].shape:
                raise CheckpointError(f"{source}: tensor {name!r} has shape {tensors[name].shape}, but config.json "
                                      "(dim_embed_domain, dim_adapter_hidden, hidden_size, tokens_per_embedding) "
                                      f"implies {var[...].shape[::-1] if transpose else var[...].shape}.")
            updates.append((var, jnp.asarray(value, var[...].dtype)))
    for var, value in updates:
        var[...] = value
    adapter.input_mean[...] = jnp.zeros_like(adapter.input_mean[...])  # the file's adapter.0 has it folded in
    adapter.input_scale[...] = jnp.ones_like(adapter.input_scale[...])


def embed_head_to_hf(head: EmbedHead) -> Tensors:
    """The head's Linear as `embed_head.{weight,bias}` numpy tensors (PyTorch (out, in) layout)."""
    return {"embed_head.weight": np.ascontiguousarray(np.asarray(head.proj.kernel[...]).T),
            "embed_head.bias": np.asarray(head.proj.bias[...])}


def embed_head_from_hf(tensors: Tensors, hf: Mapping[str, Any], cfg: LlamaConfig,
                       rngs: nnx.Rngs) -> EmbedHead | None:
    """The embedding-prediction head of a folder's tensors, or None when it has none."""
    if "embed_head.weight" not in tensors:
        return None
    weight = tensors["embed_head.weight"]
    head = EmbedHead(cfg.hidden_size, int(hf["dim_embed_domain"]), float(hf.get("embed_pred_weight", 1.0)),
                     rngs=rngs, param_dtype=jnp.dtype(cfg.param_dtype))
    if weight.T.shape != head.proj.kernel[...].shape:
        raise CheckpointError(f"tensor 'embed_head.weight' has shape {weight.shape}; config.json (dim_embed_domain, "
                              f"hidden_size) implies {head.proj.kernel[...].shape[::-1]}.")
    head.proj.kernel[...] = jnp.asarray(weight.T, head.proj.kernel[...].dtype)
    head.proj.bias[...] = jnp.asarray(tensors["embed_head.bias"], head.proj.bias[...].dtype)
    return head


def _peft_key(path: tuple[Any, ...], layer: int) -> str:
    """The PEFT tensor name of a LoRA factor at `path` (…, module, proj, 'lora', 'a'|'b') in decoder layer `layer`."""
    module, proj, factor = path[-4], path[-3], path[-1]
    return f"{PEFT_PREFIX}model.layers.{layer}.{module}.{proj}.lora_{'A' if factor == 'a' else 'B'}.weight"


def lora_from_peft(decoder: Llama, tensors: Tensors, source: str = "adapter") -> None:
    """Copies PEFT LoRA factors (lora_A (r, in), lora_B (out, r)) into the decoder's LoRA parameters in place."""
    cfg = decoder.config
    updates = []
    for path, var in nnx.to_flat_state(nnx.state(decoder, LoRAParam)):
        layers = [path[1]] if isinstance(path[1], int) else list(range(cfg.num_layers))
        arrays = []
        for layer in layers:
            key = _peft_key(path, layer)
            if key not in tensors:
                raise CheckpointError(f"{source}: LoRA tensor {key!r} is missing; does {PEFT_CONFIG} (r, "
                                      "target_modules) belong to these weights?")
            arrays.append(tensors[key].T)
        value = arrays[0] if isinstance(path[1], int) else np.stack(arrays)
        if value.shape != var[...].shape:
            raise CheckpointError(f"{source}: LoRA tensor {_peft_key(path, layers[0])!r} has shape "
                                  f"{arrays[0].T.shape}; the config expects {var[...].shape[-2:][::-1]}.")
        updates.append((var, jnp.asarray(value, var[...].dtype)))
    for var, value in updates:
        var[...] = value


def needs_placeholder_row(model: ELM) -> bool:
    """Whether the placeholder lies past the decoder's vocabulary (then the export appends its row)."""
    vocab = model.decoder.config.vocab_size
    if model.placeholder_id > vocab:
        raise ValueError(f"placeholder id {model.placeholder_id} leaves a gap after the decoder's {vocab} rows; the "
                         "tokenizer does not belong to this decoder.")
    return model.placeholder_id == vocab


def with_placeholder_row(tensors: Tensors) -> Tensors:
    """`tensors` with a zero row appended to each vocabulary table (`VOCAB_TABLES`): the placeholder's."""
    return {k: np.concatenate([v, np.zeros((1, v.shape[1]), v.dtype)]) if k in VOCAB_TABLES else v
            for k, v in tensors.items()}


def elm_hf_config(model: ELM, tokenizer: Tokenizer, extra_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The folder's `config.json`: the Llama config, the adapter's sizes, the placeholder and `extra_config`."""
    row = needs_placeholder_row(model)
    return {
        **model.decoder.config.to_hf_dict(),
        **({"vocab_size": model.decoder.config.vocab_size + 1, PLACEHOLDER_ROW: True} if row else {}),
        "dim_embed_domain": int(model.adapter.fc_in.kernel[...].shape[0]),
        "dim_adapter_hidden": int(model.adapter.fc_in.kernel[...].shape[1]),
        "placeholder_token": tokenizer.placeholder, "placeholder_token_id": int(tokenizer.placeholder_id),
        **({TOKENS_PER_EMBEDDING: model.tokens_per_embedding} if model.tokens_per_embedding != 1 else {}),
        **({"embed_pred_weight": model.embed_head.loss_weight} if model.embed_head is not None else {}),
        **dict(extra_config or {}),
    }


def peft_config(cfg: LlamaConfig, base_model: str) -> dict[str, Any]:
    """A PEFT `adapter_config.json` for the decoder's LoRA (scale alpha / r, no dropout, no bias)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": cfg.lora_rank, "lora_alpha": cfg.lora_alpha, "target_modules": sorted(cfg.lora_targets),
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "inference_mode": True, "modules_to_save": None,
    }


def check_target(out_dir: str | os.PathLike, overwrite: bool) -> epath.Path:
    """The output path (`fs.as_path`); FileExistsError if it exists non-empty and `overwrite` is off."""
    out = fs.as_path(out_dir)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite (overwrite=True) to replace it, "
                              "or choose another --out.")
    return out


@contextlib.contextmanager
def staged_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yields a local temporary folder to fill; on success it replaces `out_dir`, on failure it is removed.

    On a local disk the folder is a hidden sibling of `out_dir`, renamed into place (atomic). A remote `out_dir`
    (gs://) has no atomic folder rename: the folder is a local temporary one that `fs.publish_dir` uploads under a
    staging prefix, then copies in with `config.json` last, so a remote folder holding `config.json` is complete.
    """
    out = check_target(out_dir, overwrite)
    if fs.is_remote(out):
        with tempfile.TemporaryDirectory(prefix="ctelm-export-") as tmp:
            yield Path(tmp)
            fs.publish_dir(Path(tmp), out, last=CONFIG)
        return
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in [*out.parent.glob(f".{out.name}.tmp-*"), *out.parent.glob(f".{out.name}.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)  # left by an export of this folder that was killed
    tmp = fs.hidden_sibling(out, "tmp")
    try:
        yield tmp
        fs.share_like_folder(tmp)
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        if out.exists() or out.is_symlink():
            old = fs.hidden_sibling(out, "old")
            os.replace(out, old / out.name)
            try:
                os.replace(tmp, out)
            except OSError:
                os.replace(old / out.name, out)
                raise
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_elm(
    model: ELM, tokenizer: Tokenizer, out_dir: str | os.PathLike, lora: str = "merge",
    extra_config: Mapping[str, Any] | None = None, extra_files: Mapping[str, str | os.PathLike] | None = None,
    overwrite: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> epath.Path:
    """Writes `model` as an ELM folder (see module doc) atomically; `extra_files` maps names in it to files to copy."""
    if lora not in LORA_MODES:
        raise ValueError(f"lora={lora!r}; choose one of {LORA_MODES}.")
    cfg = model.decoder.config
    if lora == "peft" and cfg.lora_rank == 0:
        raise ValueError("lora='peft' but the model has no LoRA factors (lora_rank=0); export with lora='merge'.")
    if model.placeholder_id != tokenizer.placeholder_id:
        raise ValueError(f"the model's placeholder id {model.placeholder_id} is not the tokenizer's "
                         f"{tokenizer.placeholder_id} ({tokenizer.placeholder!r}); they do not belong together.")
    if model.tokens_per_embedding != tokenizer.tokens_per_embedding:
        raise ValueError(f"the model takes {model.tokens_per_embedding} soft token(s) per embedding but the tokenizer "
                         f"writes {tokenizer.tokens_per_embedding} placeholder(s); they do not belong together.")
    out = check_target(out_dir, overwrite)
    tensors = {**decoder_to_hf(model.decoder, merge_lora=lora == "merge"), **adapter_to_hf(model.adapter, jnp.dtype(cfg.param_dtype))}
    if model.embed_head is not None:
        tensors.update(embed_head_to_hf(model.embed_head))
    if needs_placeholder_row(model):
        tensors = with_placeholder_row(tensors)
    hf = tokenizer.hf
    generation = {"bos_token_id": hf.bos_token_id, "eos_token_id": list(tokenizer.eos_ids),
                  "pad_token_id": tokenizer.pad_id, "do_sample": False, "suppress_tokens": [tokenizer.placeholder_id]}
    try:
        with staged_dir(out, overwrite) as tmp:
            write_tensors(tensors, tmp, max_shard_bytes)
            (tmp / CONFIG).write_text(json.dumps(elm_hf_config(model, tokenizer, extra_config), indent=2))
            (tmp / GENERATION_CONFIG).write_text(json.dumps(generation, indent=2))
            tokenizer.save(tmp)
            if lora == "peft":
                save_file(lora_to_peft(model.decoder), str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
                (tmp / PEFT_CONFIG).write_text(json.dumps(peft_config(cfg, str(out)), indent=2))
            for name, src in (extra_files or {}).items():
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                fs.copy_file(src, tmp / name)
    except Exception as e:
        if not is_disk_full(e):
            raise
        raise UserError(f"exporting to {out} failed: no space left on a disk it writes to ({e}). {out} is as it was "
                        "and the partial copy was removed; free space there and export again.") from e
    return out


def _lora_fields(folder: Path) -> dict[str, Any]:
    """LoRA settings (lora_rank, lora_alpha, lora_targets) of the folder's PEFT adapter; {} when it has none."""
    path = folder / PEFT_CONFIG
    if not path.is_file():
        return {}
    try:
        peft = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}).") from e
    targets = peft.get("target_modules")
    if peft.get("peft_type") != "LORA" or peft.get("use_rslora") or not isinstance(targets, list):
        raise CheckpointError(f"{path}: only plain LoRA (peft_type LORA, use_rslora false, target_modules a list of "
                              f"module names) loads here; got peft_type={peft.get('peft_type')!r}, "
                              f"use_rslora={peft.get('use_rslora')!r}, target_modules={targets!r}.")
    return {"lora_rank": int(peft["r"]), "lora_alpha": float(peft["lora_alpha"]),
            "lora_targets": tuple(sorted(targets))}


def import_elm(
    folder: str | os.PathLike, tokenizer: Tokenizer | None = None, placeholder: str | None = None,
    rngs: nnx.Rngs | None = None, **overrides: Any,
) -> tuple[ELM, Tokenizer]:
    """Loads an ELM folder (ours or OpenELM's, local or remote) into ctelm_jax; `overrides` set runtime fields
    (dtype, scan, LoRA).

    A PEFT adapter in the folder sets the LoRA fields and its factors are loaded; without one, LoRA overrides give
    fresh factors (B = 0) on top of the (merged) weights. The tokenizer is the folder's unless given; its
    placeholder is `placeholder`, else config.json's `placeholder_token`, else `tokenizer.default_placeholder`.
    """
    with fs.local_copy(folder) as local:
        return _import_local(local, tokenizer, placeholder, rngs, overrides)


def _import_local(folder: Path, tokenizer: Tokenizer | None, placeholder: str | None, rngs: nnx.Rngs | None,
                  overrides: dict[str, Any]) -> tuple[ELM, Tokenizer]:
    """`import_elm` of a local folder."""
    hf = read_config(folder)
    row = bool(hf.get(PLACEHOLDER_ROW))
    if row:
        hf = {**hf, "vocab_size": int(hf["vocab_size"]) - 1}
    missing = [k for k in ("dim_embed_domain", "dim_adapter_hidden") if k not in hf]
    if missing:
        raise CheckpointError(f"{folder / CONFIG}: no {missing}; not an ELM folder (a plain Llama checkpoint "
                              "loads with weights.hf.load_decoder and gets a fresh adapter from run.build).")
    lora = _lora_fields(folder)
    conflicts = {k: (v, overrides[k]) for k, v in lora.items() if k in overrides and overrides[k] != v}
    if conflicts:
        raise ValueError(f"{folder / PEFT_CONFIG} sets {conflicts} (adapter vs override); drop the LoRA overrides "
                         "or export with lora='merge' to start new LoRA factors.")
    cfg = LlamaConfig.from_hf_dict(hf, **{**overrides, **lora})
    k = int(hf.get(TOKENS_PER_EMBEDDING, 1))
    if tokenizer is None:
        tokenizer = Tokenizer.from_dir(folder, placeholder or hf.get("placeholder_token"), k)
    if tokenizer.tokens_per_embedding != k:
        raise ValueError(f"the tokenizer writes {tokenizer.tokens_per_embedding} placeholder(s) per embedding but "
                         f"{folder / CONFIG} has {TOKENS_PER_EMBEDDING}={k}; pass a tokenizer made with {k}.")
    if len(tokenizer) > cfg.vocab_size + 1:
        raise CheckpointError(f"{folder}: tokenizer has {len(tokenizer)} tokens but the decoder's vocabulary is "
                              f"{cfg.vocab_size}; they do not belong together.")
    rngs = rngs or nnx.Rngs(0)
    tensors = read_tensors(folder)
    if row:  # the appended placeholder row (module doc) is not part of the decoder
        tensors = {k: v[:-1] if k in VOCAB_TABLES else v for k, v in tensors.items()}
    decoder = Llama(cfg, rngs=rngs)
    decoder_from_hf(decoder, tensors, source=str(folder))
    adapter = Adapter(int(hf["dim_embed_domain"]), int(hf["dim_adapter_hidden"]), cfg.hidden_size, rngs=rngs,
                      param_dtype=jnp.dtype(cfg.param_dtype), dtype=jnp.dtype(cfg.dtype), tokens_per_embedding=k)
    adapter_from_hf(adapter, tensors, source=str(folder))
    if lora:
        weights = folder / PEFT_WEIGHTS
        try:
            peft_tensors = load_file(str(weights))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{weights}: missing or unreadable ({e}); {PEFT_CONFIG} needs it beside it.") from e
        lora_from_peft(decoder, peft_tensors, source=str(weights))
    return ELM(decoder, adapter, tokenizer.placeholder_id, embed_head_from_hf(tensors, hf, cfg, rngs)), tokenizer
