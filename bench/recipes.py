"""The recipes the benchmark scripts train (`bench/ablation.py`, `bench/learning_curve.py`): `configs/default.py` with
one part of ctELM's recipe taken out or changed, by name (`VARIANTS`: name -> (row label, change of the config))."""

from __future__ import annotations

from typing import Callable

import ml_collections


def _as_ablated(c: ml_collections.ConfigDict) -> None:
    """The recipe the rows ablate: one soft token per embedding, the word-concept task in stages 2 and 3."""
    c.model.tokens_per_embedding = 1
    for stage, weight in zip(c.stages[1:], (0.2, 0.05)):
        stage["tasks"] = {**stage["tasks"], "concept": weight}


def _ablated(change: Callable[[ml_collections.ConfigDict], None]) -> Callable[[ml_collections.ConfigDict], None]:
    """`change` applied to the recipe the rows ablate."""
    def apply(c: ml_collections.ConfigDict) -> None:
        _as_ablated(c)
        change(c)
    return apply


def _without_tasks(c: ml_collections.ConfigDict, *names: str) -> None:
    for stage in c.stages:
        stage["tasks"] = {k: v for k, v in stage["tasks"].items() if k not in names}


def _no_offset(c: ml_collections.ConfigDict) -> None:
    _without_tasks(c, "offset")


def _no_concept_words(c: ml_collections.ConfigDict) -> None:
    _without_tasks(c, "concept")


def _no_noise(c: ml_collections.ConfigDict) -> None:
    c.data.embedding_noise = 0.0


def _no_embed(c: ml_collections.ConfigDict) -> None:
    c.model.embed_pred_weight = 0.0
    _without_tasks(c, "embed")


def _describe_only(c: ml_collections.ConfigDict) -> None:
    _no_embed(c)
    for stage in c.stages:
        stage["tasks"] = {"describe": 1.0}


def _k4(c: ml_collections.ConfigDict) -> None:
    c.model.tokens_per_embedding = 4


def _edit_pair(c: ml_collections.ConfigDict) -> None:
    c.concepts.method = "edit_pair"


COUNTERFACTUAL_WEIGHTS = (0.25, 0.4, 0.15)  # per stage: beside describe 1.0 / 0.4 / 0.3


def _counterfactual(c: ml_collections.ConfigDict) -> None:
    _edit_pair(c)
    for stage, weight in zip(c.stages, COUNTERFACTUAL_WEIGHTS):
        stage["tasks"] = {**stage["tasks"], "counterfactual": weight}


REVISE_WEIGHTS = (0.0, 0.2, 0.2)  # per stage: beside describe 1.0 / 0.4 / 0.3; alignment first teaches reading


def _revise(c: ml_collections.ConfigDict) -> None:
    for stage, weight in zip(c.stages, REVISE_WEIGHTS):
        if weight:
            stage["tasks"] = {**stage["tasks"], "revise": weight}


VARIANTS: dict[str, tuple[str, Callable[[ml_collections.ConfigDict], None]]] = {
    "full": ("full recipe, k = 1", _as_ablated),
    "no_offset": ("without concept-offset training", _ablated(_no_offset)),
    "no_concept_words": ("without the word-concept task", _ablated(_no_concept_words)),
    "no_noise": ("without smoothness (embedding noise 0)", _ablated(_no_noise)),
    "no_embed": ("without embedding prediction", _ablated(_no_embed)),
    "describe_only": ("describe only", _ablated(_describe_only)),
    "k4": ("k = 4 soft tokens per embedding", _ablated(_k4)),
    "default": ("configs/default.py: k = 4, without the word-concept task", lambda c: None),
    "edit_pair": ("the default with edit-pair concept vectors", _edit_pair),
    "counterfactual": ("the default with edit-pair vectors and the counterfactual task", _counterfactual),
    "revise": ("the default with the revise task", _revise),
}
