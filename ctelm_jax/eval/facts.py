"""Fact-level scores of a decoded trial text against the true one, in the categories of ctELM (arXiv 2601.18796).

  key facts  share of the six key fields right: phase, conditions and interventions (the same items), age bounds
             (both exact), sex, status;
  terms      conditions / interventions item F1;
  numbers    age bounds exact, and each within AGE_TOLERANCE years (an open bound matches only an open bound);
  logic      of the true criteria items found in the text (token F1 >= ITEM_MATCH with a decoded item), the share found
             on the right side (an inclusion item under "Inclusion", an exclusion item under "Exclusion"), pooled
             over trials.

Both texts are read with `render.field_lines` (the lenient reading of the rendering's "Name: value" lines), so a cut or
malformed text scores 0 on each field it lacks and is scored as written on the others. Values compare normalised
(`probes.normalise`: case, whitespace, a final period).
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Sequence

import numpy as np

from ctelm_jax.data import render
from ctelm_jax.eval.probes import normalise

FIELDS: tuple[str, ...] = ("phase", "conditions", "interventions", "ages", "sex", "status")
AGE_TOLERANCE = 5.0  # years
ITEM_MATCH = 0.5  # token F1 from which a decoded criteria item is the true one (paraphrases of it count)
Ages = tuple[float | None, float | None]


@dataclasses.dataclass(frozen=True)
class Facts:
    """The facts a trial text states; None where its line is missing or unreadable."""

    phase: str | None
    status: str | None
    conditions: frozenset[str] | None
    interventions: frozenset[str] | None
    ages: Ages | None
    sex: str | None
    inclusion: tuple[str, ...]
    exclusion: tuple[str, ...]


def read(text: str) -> Facts:
    """The facts of a (possibly cut or malformed) trial text, values normalised."""
    lines = render.field_lines(text)

    def value(name: str) -> str | None:
        return normalise(lines[name]) if name in lines else None

    def names(name: str) -> frozenset[str] | None:
        if name not in lines:
            return None
        return frozenset(n for n in map(normalise, render.list_items(lines[name])) if n)

    sex = value("Sex")
    return Facts(phase=value("Phase"), status=value("Status"), conditions=names("Conditions"),
                 interventions=names("Interventions"),
                 ages=render.parse_ages(lines["Ages"]) if "Ages" in lines else None,
                 sex=sex if sex in render.SEXES else None,
                 inclusion=tuple(map(normalise, render.list_items(lines.get("Inclusion")))),
                 exclusion=tuple(map(normalise, render.list_items(lines.get("Exclusion")))))


def item_f1(predicted: frozenset[str] | None, truth: frozenset[str] | None) -> float:
    """F1 of predicted against true items (1 when both are empty, 0 for a missing line)."""
    if predicted is None or truth is None:
        return 0.0
    if not predicted and not truth:
        return 1.0
    hits = len(predicted & truth)
    return 2 * hits / (len(predicted) + len(truth))


def ages_within(predicted: Ages | None, truth: Ages | None, tolerance: float = AGE_TOLERANCE) -> bool:
    """Whether each age bound is within `tolerance` years of the true one (an open bound matches only an open one)."""
    if predicted is None or truth is None:
        return False
    return all((p is None and t is None) or (p is not None and t is not None and abs(p - t) <= tolerance)
               for p, t in zip(predicted, truth))


def _token_f1(a: str, b: str) -> float:
    """F1 of the word tokens of two texts."""
    ta, tb = collections.Counter(re.findall(r"\w+", a)), collections.Counter(re.findall(r"\w+", b))
    common = sum((ta & tb).values())
    return 2 * common / (sum(ta.values()) + sum(tb.values())) if common else 0.0


def _best(item: str, candidates: Sequence[str]) -> float:
    """The highest token F1 of `item` with any candidate (0 if none)."""
    return max((_token_f1(item, c) for c in candidates), default=0.0)


def criteria_sides(predicted: Facts, truth: Facts) -> tuple[int, int]:
    """(true criteria items found in the text on the right side, found at all): an item is found where its best
    match scores >= ITEM_MATCH, on the side of its better match (a text that states it equally on both sides
    contradicts itself: wrong)."""
    right = found = 0
    for items, same, other in ((truth.inclusion, predicted.inclusion, predicted.exclusion),
                               (truth.exclusion, predicted.exclusion, predicted.inclusion)):
        for item in items:
            here, there = _best(item, same), _best(item, other)
            if max(here, there) >= ITEM_MATCH:
                found += 1
                right += here > there
    return right, found


def score(text: str, truth: str) -> dict[str, float]:
    """The fact scores of one decoded text against the true rendering: each key field right (0/1), `key_facts`
    (their mean), `conditions_f1`, `interventions_f1`, `ages_within` (0/1), `logic_right` / `logic_found` (counts)."""
    p, t = read(text), read(truth)
    right = {
        "phase": p.phase is not None and p.phase == t.phase,
        "conditions": p.conditions is not None and p.conditions == t.conditions,
        "interventions": p.interventions is not None and p.interventions == t.interventions,
        "ages": p.ages is not None and p.ages == t.ages,
        "sex": p.sex is not None and p.sex == t.sex,
        "status": p.status is not None and p.status == t.status,
    }
    out = {name: float(right[name]) for name in FIELDS}
    out["key_facts"] = float(np.mean([right[name] for name in FIELDS]))
    out["conditions_f1"] = item_f1(p.conditions, t.conditions)
    out["interventions_f1"] = item_f1(p.interventions, t.interventions)
    out["ages_within"] = float(ages_within(p.ages, t.ages))
    out["logic_right"], out["logic_found"] = map(float, criteria_sides(p, t))
    return out


def fact_table(texts: Sequence[str], truths: Sequence[str]) -> dict[str, float]:
    """Mean fact scores of texts against their true renderings (see `score`); `logic` is the pooled share of found
    criteria items on the right side (nan when none was found) over `logic_n` items."""
    if len(texts) != len(truths):
        raise ValueError(f"{len(texts)} texts but {len(truths)} true texts.")
    if not texts:
        raise ValueError("fact scores need at least one text.")
    scores = [score(x, y) for x, y in zip(texts, truths)]
    keys = ("key_facts", *FIELDS, "conditions_f1", "interventions_f1", "ages_within")
    row = {k: float(np.mean([s[k] for s in scores])) for k in keys}
    right, found = sum(s["logic_right"] for s in scores), sum(s["logic_found"] for s in scores)
    row["logic"] = right / found if found else float("nan")
    row["logic_n"] = int(found)
    row["n"] = len(scores)
    return row
