"""What a training run feeds its steps: the concept vectors of the `offset` task, the edited trials of the
`counterfactual` task and the batch iterators of each curriculum stage, over the run's corpus splits
(`run.corpus`)."""

from __future__ import annotations

import os
from typing import Any, Iterator

import ml_collections
import numpy as np

from ctelm_jax import concepts, fs
from ctelm_jax.data import pipeline, tasks
from ctelm_jax.errors import UserError
from ctelm_jax.models.adapter import standardisation
from ctelm_jax.run.concepts import edit_embeddings, load_or_compute
from ctelm_jax.run.corpus import Split
from ctelm_jax.train.curriculum import Curriculum, Stage
from ctelm_jax.weights.tokenizer import Tokenizer


def offset_vectors(curriculum: Curriculum, workdir: str | os.PathLike, train: Split,
                   config: ml_collections.ConfigDict | None = None) -> np.ndarray | None:
    """The `offset` task's concept vectors (rows in `tasks.OFFSET_CONCEPTS` order), or None when no stage trains it:
    those saved with the run (`<workdir>/concepts.npz`), else the built-in concepts of the training split by
    `config`'s `concepts.method` (None: centroid), computed and saved (process 0) at the start of the run, so the
    evaluation moves along the vectors the run learnt."""
    if not any("offset" in s.task_weights for s in curriculum.stages):  # the curriculum keeps weights > 0 only
        return None
    try:
        found, _ = load_or_compute(workdir, train, config)
    except UserError:  # names its own fix
        raise
    except ValueError as e:
        raise UserError(f"the offset task moves embeddings along concept vectors of the training split, and {e} "
                        "Train on more records (--config.data.max_records=0: all), or drop offset from the "
                        "stages' tasks.") from e
    missing = [name for name in tasks.OFFSET_CONCEPTS if name not in found]
    if missing:
        raise ValueError(f"{fs.as_path(workdir) / concepts.NPZ} has no vector for {missing}; move it away so that the "
                         "run computes the built-in concepts again.")
    return np.stack([found[name].vector for name in tasks.OFFSET_CONCEPTS])


def counterfactuals(curriculum: Curriculum, workdir: str | os.PathLike, train: Split,
                    config: ml_collections.ConfigDict) -> tasks.Counterfactuals | None:
    """The `counterfactual` task's edited training trials, each concept's `concepts.n_trials` trials at +1 and -1
    (`run.concepts.edit_embeddings`: embedded once per run, cached in the workdir), or None when no stage trains
    the task."""
    if not any("counterfactual" in s.task_weights for s in curriculum.stages):
        return None
    pairs = edit_embeddings(workdir, config, train)
    rows, names, strengths, embeddings = [], [], [], []
    for name in tasks.OFFSET_CONCEPTS:
        for strength, embedded in ((1.0, pairs[name].plus), (-1.0, pairs[name].minus)):
            rows += pairs[name].rows
            names += [name] * len(pairs[name].rows)
            strengths += [strength] * len(pairs[name].rows)
            embeddings.append(embedded)
    return tasks.Counterfactuals(np.asarray(rows), tuple(names), np.asarray(strengths), np.concatenate(embeddings))


def _make(config: ml_collections.ConfigDict, split: Split, tokenizer: Tokenizer, weights: dict[str, float],
          seed: int, concept_vectors: np.ndarray | None, noise_std: float = 0.0, prefetch: int = 0,
          edited: tasks.Counterfactuals | None = None) -> Any:
    # Every configured task keeps its index (task_ids follow config.data.tasks); unused ones get weight 0.
    ordered = {t: float(weights.get(t, 0.0)) for t in config.data.tasks}
    return pipeline.make_pipeline(
        split.records, split.embeddings, tokenizer, ordered, seq_len=int(config.data.seq_len),
        batch_size=int(config.data.global_batch_size), seed=seed,
        max_embeddings_per_row=int(config.data.max_embeddings_per_row), embedding_dim=int(config.model.domain_dim),
        concept_vectors=concept_vectors, noise_std=noise_std, prefetch=prefetch, counterfactuals=edited)


def train_batches(config: ml_collections.ConfigDict, split: Split, tokenizer: Tokenizer, stage: Stage,
                  seed: int, concept_vectors: np.ndarray | None = None,
                  edited: tasks.Counterfactuals | None = None) -> Any:
    """The stage's endless, checkpointable iterator of this host's rows of each global batch; input embeddings get
    noise of `data.embedding_noise` times the training split's spread (the adapter's scale) per dimension; `edited`
    are the `counterfactual` task's trials of `split` (`counterfactuals`)."""
    noise = float(config.data.get("embedding_noise", 0.0))
    noise_std = noise * float(standardisation(split.embeddings)[1][0]) if noise > 0 else 0.0
    return _make(config, split, tokenizer, stage.task_weights, seed, concept_vectors, noise_std,
                 prefetch=int(config.data.get("prefetch", 0)), edited=edited)


def eval_batches(config: ml_collections.ConfigDict, split: Split, tokenizer: Tokenizer, stage: Stage,
                 concept_vectors: np.ndarray | None = None) -> Iterator[dict[str, np.ndarray]]:
    """A fixed set of validation batches for the stage's tasks (same seed every time, no noise); the
    `counterfactual` task is left out (its edited trials are training trials): a stage of that task alone has none."""
    weights = {t: w for t, w in stage.task_weights.items() if t != "counterfactual"}
    if not weights:
        return
    it = _make(config, split, tokenizer, weights, seed=12345, concept_vectors=concept_vectors)
    for _ in range(int(config.eval.batches)):
        yield next(it)
