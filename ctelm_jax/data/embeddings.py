"""Trial embeddings on disk, beside the records they describe, and the resumable job that computes them.

An embedding set `<out>` is three files: `<out>.npy` (float32, N x dim, row i embeds record i),
`<out>.ids.json` (the N NCT ids in row order) and `<out>.meta.json` (encoder name, dim, normalisation, ...).
`embed_corpus` writes finished chunks into `<out>.partial/` and continues from them after an interruption;
the final files are each replaced atomically and the partial folder is removed. In a multi-process run each process
embeds its share of every chunk on its own devices and process 0 alone writes; the set equals the one-process set.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from etils.epath import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

import jax
import numpy as np
from absl import logging
from tqdm import tqdm

from ctelm_jax import fs
from ctelm_jax.errors import MissingInput
from ctelm_jax.parallel.distributed import gather_shares, local_data_mesh, process_share, run_on_process_0

if TYPE_CHECKING:
    from ctelm_jax.encoders.bert import SentenceEncoder

ARRAY_SUFFIX, IDS_SUFFIX, META_SUFFIX, PARTIAL_SUFFIX = ".npy", ".ids.json", ".meta.json", ".partial"
STATE_FILE = "state.json"


class Encoder(Protocol):
    """What `embed_corpus` needs of an encoder (`encoders.bert.SentenceEncoder` is one)."""

    name: str
    pooling: str
    normalize: bool
    max_length: int

    @property
    def dim(self) -> int: ...

    def encode(self, texts: Sequence[str], batch_size: int = 64,
               progress: Callable[[int], Any] | None = None) -> np.ndarray: ...


def embedding_paths(out: str | os.PathLike) -> tuple[Path, Path, Path]:
    """(array, ids, meta) file paths of the embedding set `out` (given with or without `.npy`)."""
    out = str(out)
    stem = out[: -len(ARRAY_SUFFIX)] if out.endswith(ARRAY_SUFFIX) else out
    return fs.as_path(stem + ARRAY_SUFFIX), fs.as_path(stem + IDS_SUFFIX), fs.as_path(stem + META_SUFFIX)


def _atomic_write(path: Path, data: bytes) -> None:
    """Writes bytes to `path` through a temporary file and `os.replace`, so readers never see half a file (an
    object store's upload is all or nothing by itself)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if fs.is_remote(path):
        path.write_bytes(data)
        return
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _npy_bytes(array: np.ndarray) -> bytes:
    """The .npy serialisation of an array."""
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _json_bytes(obj: Any) -> bytes:
    """Indented JSON as UTF-8."""
    return (json.dumps(obj, indent=1) + "\n").encode()


def check_embeddings(
    ids: Sequence[str], array: np.ndarray, source: str, expected_dim: int | None = None, fix: str = "",
) -> None:
    """Raises ValueError naming the problem when row i does not embed record `ids[i]` one to one, a row is NaN/inf,
    the array is not float32 (N, dim) or its width is not `expected_dim`; `fix` is appended to every message."""
    if array.ndim != 2 or array.dtype != np.float32:
        raise ValueError(f"{source}: embeddings are {array.dtype} with shape {array.shape}; expected float32 "
                         f"(N, dim).{fix}")
    if len(ids) != array.shape[0]:
        raise ValueError(f"{source}: {len(ids)} records but {array.shape[0]} embedding rows; row i must embed record "
                         f"i, so embed the same records in the same order.{fix}")
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"{source}: duplicate NCT ids {dup[:5]}; each record must appear once.{fix}")
    bad = np.flatnonzero(~np.isfinite(array).all(axis=1))
    if bad.size:
        raise ValueError(f"{source}: {bad.size} embedding rows contain NaN or inf (rows {bad[:5].tolist()}, ids "
                         f"{[ids[i] for i in bad[:5]]}); re-embed those records or drop them from the corpus.{fix}")
    if expected_dim is not None and array.shape[1] != expected_dim:
        raise ValueError(f"{source}: embeddings have dim {array.shape[1]} but {expected_dim} is expected; embed "
                         f"with the encoder the model was configured for, or set its embedding dim to "
                         f"{array.shape[1]}.{fix}")


def save_embeddings(out: str | os.PathLike, ids: Sequence[str], array: np.ndarray, meta: dict[str, Any]) -> Path:
    """Validates and writes `<out>.npy`, `<out>.ids.json`, `<out>.meta.json` (each atomically); returns the .npy."""
    array_path, ids_path, meta_path = embedding_paths(out)
    check_embeddings(list(ids), array, str(array_path))
    meta = {**meta, "dim": int(array.shape[1]), "count": int(array.shape[0])}
    _atomic_write(array_path, _npy_bytes(array))
    _atomic_write(ids_path, _json_bytes(list(ids)))
    _atomic_write(meta_path, _json_bytes(meta))
    return array_path


def load_embeddings(path: str | os.PathLike, expected_dim: int | None = None) -> tuple[list[str], np.ndarray, dict]:
    """(ids, float32 array (N, dim), meta) of an embedding set, validated; ValueError names the problem and fix."""
    array_path, ids_path, meta_path = embedding_paths(path)
    fix = f" Re-create them with `python -m ctelm_jax.embed --out={str(array_path)[: -len(ARRAY_SUFFIX)]}`."
    for p in (array_path, ids_path, meta_path):
        if not p.is_file():
            raise MissingInput(f"{p}: missing; an embedding set is {ARRAY_SUFFIX} + {IDS_SUFFIX} + "
                                    f"{META_SUFFIX}.{fix}")
    try:
        with array_path.open("rb") as f:
            array = np.load(f, allow_pickle=False)
        ids = json.loads(ids_path.read_text())
        meta = json.loads(meta_path.read_text())
    except (ValueError, OSError) as e:
        raise ValueError(f"{array_path}: unreadable embedding set ({e}).{fix}") from e
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise ValueError(f"{ids_path}: expected a JSON list of NCT id strings.{fix}")
    check_embeddings(ids, array, str(array_path), expected_dim, fix)
    if meta.get("dim") != array.shape[1] or meta.get("count") != array.shape[0]:
        raise ValueError(f"{meta_path}: says dim={meta.get('dim')}, count={meta.get('count')} but the array is "
                         f"{array.shape}; the files come from different runs.{fix}")
    return ids, array, meta


def _text_fn_name(text_fn: Callable[[dict], str]) -> str:
    """`module.qualname` of the function that renders records to text, for the metadata."""
    return f"{getattr(text_fn, '__module__', '?')}.{getattr(text_fn, '__qualname__', repr(text_fn))}"


def load_encoder(encoder: str = "default", name: str | None = None, max_length: int | None = None) -> SentenceEncoder:
    """The sentence encoder `encoder` names ("default": the embedded all-MiniLM-L6-v2, else a sentence-transformers
    or HF BERT folder), its batches split over this process's devices; `name` is recorded in the metadata."""
    from ctelm_jax.encoders.bert import SentenceEncoder
    from ctelm_jax.weights.default import ENCODER_NAME, encoder_dir

    name = name or (ENCODER_NAME if encoder == "default" else None)
    return SentenceEncoder.from_dir(encoder_dir(encoder), max_length=max_length, mesh=local_data_mesh(), name=name)


def embed_corpus(
    records: Sequence[dict], encoder: Encoder, out: str | os.PathLike, text_fn: Callable[[dict], str],
    batch_size: int = 64, chunk_size: int | None = None, show_progress: bool = True,
) -> Path:
    """Embeds `text_fn(record)` for every record into the set `out`, resuming from `<out>.partial/`; returns the .npy.

    Work is done in chunks of `chunk_size` records (default 8 batches); each finished chunk is saved, so a rerun
    with the same records, encoder and sizes recomputes only the unfinished chunks, whatever the process count.
    In a multi-process run every process calls this with the same arguments: each embeds its `process_share` of
    every chunk on its own devices (`encoder`, e.g. `load_encoder`, must use only those), the shares are gathered
    in order, and process 0 alone writes; every process returns once the set is complete.
    """
    chunk_size = chunk_size or 8 * batch_size
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}; it must be positive.")
    ids = []
    for i, r in enumerate(records):
        if not isinstance(r.get("nctid"), str) or not r["nctid"]:
            raise ValueError(f"record {i} has no 'nctid'; every record needs its NCT id.")
        ids.append(r["nctid"])
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate NCT ids {sorted({i for i in ids if ids.count(i) > 1})[:5]}; deduplicate first.")
    meta = {"encoder": encoder.name, "dim": encoder.dim, "normalized": encoder.normalize, "pooling": encoder.pooling,
            "max_length": encoder.max_length, "text_fn": _text_fn_name(text_fn)}
    state = {**meta, "chunk_size": chunk_size, "count": len(ids),
             "ids_sha256": hashlib.sha256(json.dumps(ids).encode()).hexdigest()}
    array_path = embedding_paths(out)[0]
    partial = fs.as_path(str(array_path)[: -len(ARRAY_SUFFIX)] + PARTIAL_SUFFIX)
    starts = range(0, len(ids), chunk_size)
    chunk_files = [partial / f"chunk_{k:06d}.npy" for k in range(len(starts))]
    done = run_on_process_0(lambda: _open_partial(partial, state, chunk_files), f"open {partial}",
                            np.zeros(len(chunk_files), np.int32)).astype(bool)
    writer = jax.process_index() == 0
    if writer and done.any():
        logging.info("%s: resuming, %d of %d chunks already done", partial, done.sum(), len(done))
    initial = sum(min(chunk_size, len(ids) - s) for s, d in zip(starts, done) if d)
    with tqdm(total=len(ids), initial=initial, unit="text", desc="embedding",
              disable=not (show_progress and writer)) as bar:
        for start, chunk_file, finished in zip(starts, chunk_files, done):
            if finished:
                continue
            chunk = records[start:start + chunk_size]
            mine = process_share(len(chunk))
            emb = encoder.encode([text_fn(r) for r in chunk[mine]], batch_size=batch_size, progress=bar.update)
            emb = gather_shares(emb, len(chunk))
            bar.update(len(chunk) - (mine.stop - mine.start))
            check_embeddings(ids[start:start + len(chunk)], emb, f"{encoder.name} on records {start}..",
                             encoder.dim)
            if writer:
                _atomic_write(chunk_file, _npy_bytes(emb))
    run_on_process_0(lambda: _assemble(out, ids, meta, partial, chunk_files, encoder.dim), f"write {array_path}")
    return array_path


def _open_partial(partial: Path, state: dict[str, Any], chunk_files: Sequence[Path]) -> list[bool]:
    """Creates the partial folder, or checks that an existing one was started with the same `state`; returns which
    of `chunk_files` are finished."""
    state_file = partial / STATE_FILE
    if state_file.is_file():
        old = json.loads(state_file.read_text())
        diff = sorted(k for k in set(old) | set(state) if old.get(k) != state.get(k))
        if diff:
            raise ValueError(
                f"{partial}: an interrupted run with different {diff} ({ {k: old.get(k) for k in diff} } vs now "
                f"{ {k: state.get(k) for k in diff} }); rerun with the same settings to resume, or delete {partial} "
                "to start over.")
        return [f.is_file() for f in chunk_files]
    partial.mkdir(parents=True, exist_ok=True)
    _atomic_write(state_file, _json_bytes(state))
    return [False] * len(chunk_files)


def _assemble(out: str | os.PathLike, ids: list[str], meta: dict[str, Any], partial: Path,
              chunk_files: Sequence[Path], dim: int) -> None:
    """Writes the set `out` from the finished chunks, then removes the partial folder."""
    array = np.concatenate([_load_chunk(f, dim) for f in chunk_files]) if ids else np.zeros((0, dim), np.float32)
    save_embeddings(out, ids, array, meta)
    partial.rmtree()


def _load_chunk(path: Path, dim: int) -> np.ndarray:
    """A finished chunk's float32 rows."""
    with path.open("rb") as f:
        array = np.load(f, allow_pickle=False)
    if array.ndim != 2 or array.shape[1] != dim:
        raise ValueError(f"{path}: chunk has shape {array.shape}, expected (n, {dim}); delete it to recompute.")
    return array
