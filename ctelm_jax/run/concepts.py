"""A run's concept vectors: those saved in its workdir (`concepts.npz` + `concepts.json`), else the built-in concepts
of its training split, computed once and saved with the run, so training's `offset` task, the evaluation and the
explorer all move along the same vectors."""

from __future__ import annotations

import os

import jax

from ctelm_jax import concepts, fs
from ctelm_jax.run.config import load_run_config
from ctelm_jax.run.corpus import Split, load_splits


def compute(workdir: str | os.PathLike, train: Split | None = None) -> dict[str, concepts.Concept]:
    """The built-in concepts of the run's training split (read from the run when not given), saved with the run by
    process 0; a group no training trial falls in raises `concepts.define`'s ValueError."""
    if train is None:
        train = load_splits(load_run_config(workdir), workdir)["train"]
    found = concepts.builtin(train.records, train.embeddings)
    if jax.process_index() == 0:
        concepts.save(workdir, found, source="train split")
    return found


def load_or_compute(workdir: str | os.PathLike, train: Split | None = None) -> tuple[dict[str, concepts.Concept], str]:
    """The run's concept vectors and a note saying where they came from: the saved ones, else `compute`'s."""
    workdir = fs.as_path(workdir)
    if concepts.saved(workdir):
        return concepts.load(workdir), f"loaded from {workdir / concepts.NPZ}"
    return compute(workdir, train), f"computed from the training split and saved to {workdir / concepts.NPZ}"
