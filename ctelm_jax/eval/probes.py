"""Scoring of decoded answers: attribute accuracy, concept responsiveness curves, and novel (off-corpus) vectors."""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import numpy as np

from ctelm_jax import concepts as concepts_lib
from ctelm_jax.data import render
from ctelm_jax.data.render import TrialFields
from ctelm_jax.eval import metrics

EVAL_ATTRIBUTES: tuple[str, ...] = ("phase", "conditions", "ages", "sex")
AGE_OPEN_LOW, AGE_OPEN_HIGH = 0.0, 100.0  # open ends of an age range, for the age score


# ----------------------------------------------------------------------------------------------------------------
# attributes

def normalise(text: str) -> str:
    """Lower case, whitespace collapsed, outer whitespace and a final period dropped."""
    return re.sub(r"\s+", " ", text).strip().rstrip(".").strip().lower()


def _items(text: str) -> set[str]:
    """The items of a '; '-separated answer, normalised."""
    return {normalise(x) for x in text.split(";") if normalise(x)}


def _equal(attribute: str, answer: str, truth: str) -> bool:
    """Whether an answer equals the truth (normalised; ages compared as parsed ranges)."""
    if attribute == "ages":
        parsed = render.parse_ages(normalise(answer))
        return parsed is not None and parsed == render.parse_ages(normalise(truth))
    return normalise(answer) == normalise(truth)


def field_line(attribute: str, answer: str) -> str | None:
    """The value of the answer's own "<Attribute>: value" line, when it answered with (part of) a trial text."""
    m = re.search(rf"^{attribute.capitalize()}: (.*)$", answer, re.M)
    return m.group(1) if m else None


def score_answer(attribute: str, answer: str, truth: str) -> dict[str, bool]:
    """{"exact": the answer equals the truth; "field": exact, or the answer is a trial text whose line for the
    attribute equals the truth; "overlap": for lists, at least one item shared (else the same as exact)}."""
    exact = _equal(attribute, answer, truth)
    line = field_line(attribute, answer)
    overlap = bool(_items(answer) & _items(truth)) if attribute in ("conditions", "interventions") else exact
    return {"exact": exact, "field": exact or (line is not None and _equal(attribute, line, truth)), "overlap": overlap}


def attribute_accuracy(answers: Mapping[str, Sequence[str]], truths: Mapping[str, Sequence[str]],
                       majority: Mapping[str, str] | None = None) -> dict[str, dict[str, float]]:
    """Per attribute: shares exact / field / overlapping (see `score_answer`), count, and (if given) the majority
    answer's exact share."""
    out = {}
    for attribute, predicted in answers.items():
        true = truths[attribute]
        scores = [score_answer(attribute, a, t) for a, t in zip(predicted, true)]
        row = {k: float(np.mean([s[k] for s in scores])) for k in ("exact", "field", "overlap")}
        row["n"] = len(scores)
        if majority is not None:
            row["majority"] = float(np.mean([score_answer(attribute, majority[attribute], t)["exact"] for t in true]))
        out[attribute] = row
    return out


def majority_answers(fields: Sequence[TrialFields], attributes: Sequence[str] = EVAL_ATTRIBUTES) -> dict[str, str]:
    """The most common true answer per attribute (the trivial baseline)."""
    from ctelm_jax.data.tasks import attribute_answer

    out = {}
    for attribute in attributes:
        values, counts = np.unique([attribute_answer(f, attribute) for f in fields], return_counts=True)
        out[attribute] = str(values[np.argmax(counts)])
    return out


# ----------------------------------------------------------------------------------------------------------------
# concept responsiveness


def extract_fields(text: str) -> TrialFields | None:
    """`render.parse_text` of a decoded text, or, for a cut or malformed one, the age range and sex from its "Ages:"
    and "Sex:" lines (other fields empty); None if neither line parses."""
    parsed = render.parse_text(text)
    if parsed is not None:
        return parsed
    lines = render.field_lines(text)
    ages = render.parse_ages(lines["Ages"]) if "Ages" in lines else None
    sex = lines.get("Sex")
    if ages is None or sex not in render.SEXES:
        return None
    return TrialFields(nctid="", phase="", status="", conditions=(), interventions=(), min_age=ages[0],
                       max_age=ages[1], sex=sex, inclusion=(), exclusion=())


def age_score(f: TrialFields) -> float:
    """Midpoint of the stated age range in years, open ends at 0 and 100 ("not stated" -> 50)."""
    lo = AGE_OPEN_LOW if f.min_age is None else f.min_age
    hi = AGE_OPEN_HIGH if f.max_age is None else f.max_age
    return (lo + hi) / 2


def sex_score(f: TrialFields) -> float:
    """women only +1, all 0, men only -1."""
    return {"female": 1.0, "all": 0.0, "male": -1.0}[f.sex]


# concept -> (score, sign: the score's direction when the concept strengthens)
CURVE_SCORES = {"age": (age_score, 1.0), "pediatric": (age_score, -1.0), "sex": (sex_score, 1.0)}
# concept -> short names of its positive and negative groups (`concepts.BUILTIN`)
CURVE_GROUPS = {"age": ("older (min age >= 60)", "adults < 60"), "pediatric": ("children (max age < 18)", "adults"),
                "sex": ("women only", "men only")}


def concept_curve(concept: str, strengths: Sequence[float], texts: Mapping[float, Sequence[str]]) -> dict:
    """How decoded texts respond to moving their embeddings along a built-in concept.

    `texts[s][i]` is trial i decoded at strength s (0 included). Per strength: `parsed` share with an age range and
    sex; `toward` / `away` shares whose score moved in / against the concept's direction relative to strength 0
    (unparsed texts count as not moved); `net` = toward - away; `positive` / `negative` shares falling in the
    concept's two defining groups; `mean_score` (concept-signed); `toward_ci` / `away_ci`: Wilson 95% intervals of
    those shares. `shape`: `shape` of net against strength. `responsive`: per non-zero strength, the share of trials
    moved with the push (toward the concept for s > 0, away for s < 0) as k of n with its Wilson interval, and
    `specific`: the share whose decode keeps the strength-0 decode's `identity` (a move changes only what it names).
    `specificity`: the mean of `specific` over the non-zero strengths.
    """
    if concept not in CURVE_SCORES:
        raise ValueError(f"no response curve for concept {concept!r}; built-in: {sorted(CURVE_SCORES)}")
    if 0.0 not in texts:
        raise ValueError("concept curves compare with strength 0; include 0 in the strengths.")
    score, sign = CURVE_SCORES[concept]
    positive_fn, negative_fn, _ = concepts_lib.BUILTIN[concept]
    base = [extract_fields(t) for t in texts[0.0]]
    base_identity = [identity(t) for t in texts[0.0]]
    rows, responsive = [], []
    for s in strengths:
        fields = [extract_fields(t) for t in texts[s]]
        moves = [np.sign(sign * (score(f) - score(b))) if f is not None and b is not None else 0.0
                 for f, b in zip(fields, base)]
        ok = [f for f in fields if f is not None]
        n = len(fields)
        toward, away = int(sum(m > 0 for m in moves)), int(sum(m < 0 for m in moves))
        rows.append({
            "strength": float(s), "parsed": len(ok) / n, "toward": toward / n, "away": away / n,
            "toward_ci": list(metrics.wilson_interval(toward, n)), "away_ci": list(metrics.wilson_interval(away, n)),
            "net": float(np.mean(moves)),
            "positive": sum(bool(positive_fn(f)) for f in ok) / n,
            "negative": sum(bool(negative_fn(f)) for f in ok) / n,
            "mean_score": float(np.mean([sign * score(f) for f in ok])) if ok else float("nan"),
        })
        if s != 0.0:
            k = toward if s > 0 else away
            kept = sum(a is not None and a == b for a, b in zip(map(identity, texts[s]), base_identity))
            responsive.append({"strength": float(s), "k": k, "n": n, "share": k / n,
                               "ci": list(metrics.wilson_interval(k, n)), "specific": kept / n,
                               "specific_ci": list(metrics.wilson_interval(kept, n))})
    nets = [r["net"] for r in sorted(rows, key=lambda r: r["strength"])]
    specificity = float(np.mean([r["specific"] for r in responsive])) if responsive else float("nan")
    return {"concept": concept, "n": len(base), "curve": rows, "shape": shape(nets), "responsive": responsive,
            "specificity": specificity}


def identity(text: str) -> tuple[str, tuple[str, ...], tuple[str, ...]] | None:
    """What a concept move must leave as it was: the phase, conditions and interventions of a decode, read line by line
    (`render.field_lines`, normalised, lists as sorted items), so that the curves' short decodes, cut after the Ages
    and Sex lines, count; None when one of the three is missing or the text stops inside the Interventions line (no
    line follows it), which keeps nothing."""
    lines = render.field_lines(text)
    names = list(lines)
    if not {"Phase", "Conditions", "Interventions"} <= set(names) or names[-1] == "Interventions":
        return None

    def items(name: str) -> tuple[str, ...]:
        return tuple(sorted(normalise(x) for x in render.list_items(lines[name])))

    return normalise(lines["Phase"]), items("Conditions"), items("Interventions")


def shape(values: Sequence[float]) -> str:
    """"flat" if all values are equal, "monotone" if they never decrease, else "not monotone"."""
    if all(v == values[0] for v in values):
        return "flat"
    if all(a <= b for a, b in zip(values, values[1:])):
        return "monotone"
    return "not monotone"


# ----------------------------------------------------------------------------------------------------------------
# novel vectors

def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def gaussian_vectors(embeddings: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n draws from a Gaussian fitted (mean, full covariance) to `embeddings`, renormalised to unit norm."""
    e = np.asarray(embeddings, np.float64)
    draws = rng.multivariate_normal(e.mean(axis=0), np.cov(e, rowvar=False), size=n, method="eigh")
    return _unit(draws)


def midpoint_vectors(embeddings: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Midpoints of n random pairs of distinct rows, renormalised; (vectors (n, d), pairs (n, 2))."""
    if len(embeddings) < 2:
        raise ValueError("midpoints need at least 2 embeddings.")
    pairs = np.stack([rng.choice(len(embeddings), 2, replace=False) for _ in range(n)])
    return _unit(embeddings[pairs[:, 0]] + embeddings[pairs[:, 1]]), pairs


def well_formed(text: str) -> bool:
    """Whether a decoded text is a complete canonical trial text (`render.parse_text` succeeds)."""
    return render.parse_text(text) is not None
