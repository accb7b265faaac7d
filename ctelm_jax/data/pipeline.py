"""Grain input pipeline: task mixing, packing, fixed-shape per-host batches, checkpointable iterator.

    records (epoch-shuffled, repeated) -> task drawn by weight + `tasks.make_example` (per-index RNG), and with
      `noise_std` > 0 Gaussian noise for each of its embeddings (the smoothness regulariser of ctELM)
      -> this host's slice (global example i goes to host i % process_count)
      -> first-fit packing into rows of `seq_len` tokens and `max_embeddings_per_row` embedding slots
      -> batches of batch_size / process_count rows, with targets and embeddings filled in; an embedding with noise
         or a concept move (`offset` task) is `concepts.apply(e + noise, v, a)`, a unit vector like the encoder's.

Everything is a function of (seed, example index), so a run is reproducible, and the iterator's state
(`get_state()`, a small JSON-serializable dict) restores it exactly (`set_state`).
"""

from __future__ import annotations

import collections
import copy
import queue
import threading
from typing import Mapping, Sequence

import grain
import jax
import numpy as np
from absl import logging

from ctelm_jax import concepts
from ctelm_jax.data import tasks
from ctelm_jax.data.embeddings import check_embeddings
from ctelm_jax.vectors import nearest_neighbours
from ctelm_jax.weights.tokenizer import Tokenizer

BATCH_KEYS: tuple[str, ...] = ("tokens", "targets", "loss_mask", "segment_ids", "positions", "embeddings", "task_ids",
                               "pool_ids", "embed_targets")
_EMBEDDINGS_PER_TASK = {"compare": 2, "revise": 2, "embed": 0}


def _task_probabilities(tasks_weights: Mapping[str, float]) -> np.ndarray:
    """Normalised task weights, checked."""
    unknown = set(tasks_weights) - set(tasks.TASKS)
    if unknown:
        raise ValueError(f"unknown task(s) {sorted(unknown)}; known: {tasks.TASKS}")
    weights = np.asarray(list(tasks_weights.values()), np.float64)
    if weights.size == 0 or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"task weights must be >= 0 with a positive sum, got {dict(tasks_weights)}")
    return weights / weights.sum()


class Stopped(Exception):
    """Raised inside a pipeline whose `stop` event is set: ends a background thread at its next example."""


class _MakeExample(grain.transforms.RandomMap):
    """Record index -> packed-ready example of a task drawn by weight (None when skipped)."""

    def __init__(self, records: Sequence[Mapping], tokenizer: Tokenizer, tasks_weights: Mapping[str, float],
                 seq_len: int, dim: int, noise_std: float = 0.0, stop: threading.Event | None = None,
                 counterfactuals: tasks.Counterfactuals | None = None, drafts: np.ndarray | None = None):
        self.records, self.tokenizer, self.seq_len, self.stop = records, tokenizer, seq_len, stop
        self.counterfactuals, self.drafts = counterfactuals, drafts
        self.dim, self.noise_std = dim, noise_std
        self.names = list(tasks_weights)
        self.probabilities = _task_probabilities(tasks_weights)
        self.stats: collections.Counter[str] = collections.Counter()

    def random_map(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray] | None:
        """The example for record `index`."""
        if self.stop is not None and self.stop.is_set():
            raise Stopped()
        task_id = int(rng.choice(len(self.names), p=self.probabilities))
        example = tasks.make_example(self.names[task_id], self.records, int(index), rng, self.tokenizer, self.seq_len,
                                     self.stats, self.counterfactuals, self.drafts)
        if self.stats:  # a warning once examples are skipped; truncated targets are only logged
            level = logging.WARNING if set(self.stats) - {"truncated"} else logging.INFO
            logging.log_every_n_seconds(level, "pipeline: %s", 600, dict(self.stats))
        if example is None:
            return None
        out = {"tokens": example["tokens"], "loss_mask": example["loss_mask"],
               "task_ids": np.full(len(example["tokens"]), task_id, np.int32),
               "embedding_indices": example["embedding_indices"], "pool_mask": example["pool_mask"],
               "target_indices": example["target_indices"], "embedding_concepts": example["embedding_concepts"],
               "embedding_strengths": example["embedding_strengths"]}
        if self.noise_std > 0:  # no key without noise (`make_dataset` packs it only then)
            slots = len(example["embedding_indices"])
            out["embedding_noise"] = (self.noise_std * rng.standard_normal((slots, self.dim))).astype(np.float32)
        return out


class _Finalize(grain.transforms.Map):
    """Packed batch -> the Batch table: targets within each example, padding cleaned, embeddings gathered."""

    def __init__(self, embeddings: np.ndarray, pad_id: int, concept_vectors: np.ndarray | None):
        self.embeddings, self.pad_id, self.concept_vectors = embeddings, pad_id, concept_vectors

    def map(self, packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The batch dict (keys `BATCH_KEYS`)."""
        segment_ids = packed["tokens_segment_ids"].astype(np.int32)
        real = segment_ids > 0
        tokens = np.where(real, packed["tokens"], self.pad_id).astype(np.int32)
        targets = np.full_like(tokens, self.pad_id)
        same = real[:, :-1] & (segment_ids[:, 1:] == segment_ids[:, :-1])
        targets[:, :-1] = np.where(same, tokens[:, 1:], self.pad_id)
        used = packed["embedding_indices_segment_ids"] > 0
        embeddings = self.embeddings[packed["embedding_indices"]] * used[..., None]
        concept, strength = packed["embedding_concepts"], packed["embedding_strengths"]
        noise = packed.get("embedding_noise")  # absent when the pipeline adds no noise
        moved = concept > 0 if noise is None else (concept > 0) | (noise != 0).any(-1)
        for b, s in zip(*np.nonzero(used & moved)):
            c = int(concept[b, s])
            e = embeddings[b, s] if noise is None else embeddings[b, s] + noise[b, s]
            vector, a = (self.concept_vectors[c - 1], float(strength[b, s])) if c else (np.zeros_like(e), 0.0)
            embeddings[b, s] = concepts.apply(e, vector, a)
        # Each pooled token points (1-based) at the target slot of its own example (same segment id).
        target_segments = packed["target_indices_segment_ids"]
        match = ((segment_ids[:, :, None] == target_segments[:, None, :]) & (target_segments[:, None, :] > 0)
                 & (packed["pool_mask"] > 0)[:, :, None] & real[:, :, None])
        pool_ids = np.where(match.any(-1), match.argmax(-1) + 1, 0).astype(np.int32)
        targets_used = (target_segments > 0)[..., None]
        return {"pool_ids": pool_ids,
                "embed_targets": (self.embeddings[packed["target_indices"]] * targets_used).astype(np.float32),
                "tokens": tokens, "targets": targets,
                "loss_mask": (packed["loss_mask"] * real).astype(np.float32), "segment_ids": segment_ids,
                "positions": np.where(real, packed["tokens_positions"], 0).astype(np.int32),
                "embeddings": embeddings.astype(np.float32), "task_ids": np.where(real, packed["task_ids"], 0)
                .astype(np.int32)}


def batch_spec(batch_size: int, seq_len: int, max_embeddings_per_row: int, embedding_dim: int,
               process_count: int = 1) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """(shape, dtype) of each batch array on one host."""
    b = batch_size // process_count
    i32, f32 = np.dtype(np.int32), np.dtype(np.float32)
    return {"tokens": ((b, seq_len), i32), "targets": ((b, seq_len), i32), "loss_mask": ((b, seq_len), f32),
            "segment_ids": ((b, seq_len), i32), "positions": ((b, seq_len), i32),
            "embeddings": ((b, max_embeddings_per_row, embedding_dim), f32), "task_ids": ((b, seq_len), i32),
            "pool_ids": ((b, seq_len), i32), "embed_targets": ((b, max_embeddings_per_row, embedding_dim), f32)}


def make_dataset(records: Sequence[Mapping], embeddings: np.ndarray, tokenizer: Tokenizer,
                 tasks_weights: Mapping[str, float], seq_len: int, batch_size: int, seed: int,
                 max_embeddings_per_row: int, *, embedding_dim: int | None = None, process_index: int | None = None,
                 process_count: int | None = None, read_threads: int = 0, concept_vectors: np.ndarray | None = None,
                 noise_std: float = 0.0, stop: threading.Event | None = None,
                 counterfactuals: tasks.Counterfactuals | None = None) -> grain.IterDataset:
    """The infinite dataset of this host's batches (see the module docstring); `batch_size` is the global batch,
    `read_threads` grain threads build examples (0: in the calling thread, ~400k tokens/s on one CPU core);
    `concept_vectors` (one row per `tasks.OFFSET_CONCEPTS`) feed the `offset` task, `counterfactuals` (edited
    trials of `records`, their embeddings appended to the table) the `counterfactual` task, and each record's nearest
    other record is its draft in the `revise` task; `noise_std` is the standard deviation of the noise added to every
    input embedding per dimension (0: none); once `stop` is set, building an example raises Stopped."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if batch_size % process_count:
        raise ValueError(f"global batch {batch_size} is not divisible by the {process_count} processes.")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} outside [0, {process_count}).")
    _task_probabilities(tasks_weights)
    needed = max(_EMBEDDINGS_PER_TASK.get(t, 1) for t, w in tasks_weights.items() if w > 0)
    if max_embeddings_per_row < needed:
        raise ValueError(f"max_embeddings_per_row={max_embeddings_per_row} but a weighted task uses {needed} "
                         f"embeddings per example; raise it (rows pack several examples, so ~seq_len / 100).")
    table = np.asarray(embeddings, np.float32)
    check_embeddings([r["nctid"] for r in records], table, "pipeline embeddings", embedding_dim)
    if tasks_weights.get("offset", 0) > 0:
        expected = (len(tasks.OFFSET_CONCEPTS), table.shape[1])
        if concept_vectors is None or np.shape(concept_vectors) != expected:
            got = None if concept_vectors is None else np.shape(concept_vectors)
            raise ValueError(f"the offset task needs one concept vector per {tasks.OFFSET_CONCEPTS} of the embeddings' "
                             f"dimension, shape {expected}, got {got}; compute them with `concepts.builtin` on the "
                             "training split.")
        concept_vectors = np.asarray(concept_vectors, np.float32)
    if tasks_weights.get("counterfactual", 0) > 0:
        if counterfactuals is None:
            raise ValueError("the counterfactual task needs the edited training trials and their embeddings "
                             "(`tasks.Counterfactuals`, from `run.concepts.edit_embeddings`); none were given.")
        if counterfactuals.embeddings.shape[1:] != table.shape[1:] or int(np.max(counterfactuals.rows)) >= len(records):
            raise ValueError(f"counterfactuals of {counterfactuals.embeddings.shape[1:]}-d embeddings of records up "
                             f"to {int(np.max(counterfactuals.rows))} do not fit {len(records)} records of "
                             f"{table.shape[1:]}-d embeddings: they were made for another split or encoder.")
        table = np.concatenate([table, np.asarray(counterfactuals.embeddings, np.float32)])
    drafts = None
    if tasks_weights.get("revise", 0) > 0:  # each record's draft: its nearest other record
        ids = [r["nctid"] for r in records]
        drafts = nearest_neighbours(table[:len(records)], table[:len(records)], ids, ids)
    if not (np.isfinite(noise_std) and noise_std >= 0):
        raise ValueError(f"noise_std={noise_std}: the embedding noise must be a finite standard deviation >= 0.")
    local_batch = batch_size // process_count
    examples = (grain.MapDataset.range(len(records)).shuffle(seed=seed).repeat()
                .random_map(_MakeExample(records, tokenizer, tasks_weights, seq_len, table.shape[1], noise_std, stop,
                                         counterfactuals, drafts), seed=seed)
                [process_index::process_count])
    lengths = {"tokens": seq_len, "loss_mask": seq_len, "task_ids": seq_len, "pool_mask": seq_len,
               **dict.fromkeys(("embedding_indices", "target_indices", "embedding_concepts", "embedding_strengths"),
                               max_embeddings_per_row)}
    if noise_std > 0:
        lengths["embedding_noise"] = max_embeddings_per_row
    packed = grain.experimental.FirstFitPackIterDataset(
        examples.to_iter_dataset(grain.ReadOptions(num_threads=read_threads)), length_struct=lengths,
        num_packing_bins=local_batch, shuffle_bins=False)
    return packed.batch(local_batch, drop_remainder=True).map(_Finalize(table, tokenizer.pad_id, concept_vectors))


def make_pipeline(records: Sequence[Mapping], embeddings: np.ndarray, tokenizer: Tokenizer,
                  tasks_weights: Mapping[str, float], seq_len: int, batch_size: int, seed: int,
                  max_embeddings_per_row: int, *, embedding_dim: int | None = None, process_index: int | None = None,
                  process_count: int | None = None, read_threads: int = 0, concept_vectors: np.ndarray | None = None,
                  noise_std: float = 0.0, prefetch: int = 0,
                  counterfactuals: tasks.Counterfactuals | None = None) -> grain.DatasetIterator:
    """An iterator of this host's batches (dicts of `BATCH_KEYS` numpy arrays with fixed shapes, `batch_spec`);
    `get_state()` / `set_state()` save and restore its position (JSON-serializable). With `prefetch`, a background
    thread keeps that many batches ready (`Prefetched`)."""
    stop = threading.Event() if prefetch else None
    batches = iter(make_dataset(records, embeddings, tokenizer, tasks_weights, seq_len, batch_size, seed,
                                max_embeddings_per_row, embedding_dim=embedding_dim, process_index=process_index,
                                process_count=process_count, read_threads=read_threads,
                                concept_vectors=concept_vectors, noise_std=noise_std, stop=stop,
                                counterfactuals=counterfactuals))
    return Prefetched(batches, prefetch, stop) if prefetch else batches


class Prefetched:
    """A checkpointable iterator that builds up to `size` elements of `parent` ahead in a daemon thread, started by
    the first `next`. Its state is that of the elements handed out, not of those built ahead, so a resume repeats
    and skips none. `close` sets `stop`, which the parent's pipeline checks at every example (`make_dataset`), so the
    thread ends within one example even in a pipeline that finds none (skipping every example), where grain's own
    prefetch, which waits for the element in progress, hangs a stopping run."""

    def __init__(self, parent: grain.DatasetIterator, size: int, stop: threading.Event):
        self._parent, self._size, self._stop = parent, size, stop
        self._state = parent.get_state()
        self._thread: threading.Thread | None = None
        self._ready: queue.Queue = queue.Queue(size)

    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                item = next(self._parent)
                entry = (item, copy.deepcopy(self._parent.get_state()), None)
                while not self._stop.is_set():
                    try:
                        self._ready.put(entry, timeout=0.1)
                        break
                    except queue.Full:
                        pass
        except Stopped:
            pass
        except BaseException as e:  # handed to the consumer, StopIteration included
            self._ready.put((None, None, e))

    def __iter__(self) -> "Prefetched":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._thread is None:
            self._thread = threading.Thread(target=self._produce, daemon=True, name="ctelm-prefetch")
            self._thread.start()
        item, state, error = self._ready.get()
        if error is not None:
            raise error
        self._state = state
        return item

    def get_state(self) -> dict:
        """The position after the last element handed out."""
        return self._state

    def set_state(self, state: dict) -> None:
        """Restores a position (before the first `next`, or after the thread has stopped)."""
        if self._thread is not None:
            self.close()  # it may have been mid-element on the parent: it ended before the parent moves
            self._thread, self._ready = None, queue.Queue(self._size)
            self._stop.clear()
        self._parent.set_state(state)
        self._state = self._parent.get_state()

    def close(self) -> None:
        """Stops the thread (within one example) and waits for it: none may be left in native code (tokenizers) when
        the interpreter exits, which aborts the process."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

