"""What the explorer shows, as numbers and texts: a 2-D map of the corpus embeddings, regions (k-means) read aloud by
the ELM with their true majority fields, interpolation paths and concept moves placed on the map with their decoded
texts, and cosine neighbour lists.

The map is PCA (scikit-learn) of the unit embeddings: a linear projection, so a path or a concept move lands on the
map exactly where its vector projects (`PCA.transform`, no refit), straight moves stay straight, and the 4,466 x 384
corpus fits in well under a second on 2 cores with nothing new to install. UMAP places new points through their
neighbours among the fitted ones (off-corpus vectors snap onto the corpus) and pulls in numba; t-SNE has no
transform at all. PCA keeps global layout but overlaps regions that k-means, run in the full space, separates.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA

from ctelm_jax import concepts as concepts_lib
from ctelm_jax import decode, prompts
from ctelm_jax.data import render
from ctelm_jax.data.render import TrialFields
from ctelm_jax.eval import probes
from ctelm_jax.models.elm import ELM
from ctelm_jax.weights.tokenizer import Tokenizer

# Coarse disease areas for colouring the map: a trial belongs to the first area (in this order) that any of its
# conditions matches; 86% of the shipped trials fall into one.
CONDITION_GROUPS: tuple[tuple[str, str], ...] = (
    ("cancer", r"cancer|carcinom|tumou?r|neoplas|lymphoma|leuka?emia|myeloma|melanoma|sarcoma|gliom|blastoma|"
               r"myelodysplastic|malignan|metasta"),
    ("infection", r"hiv|hepatitis|infect|influenza|vaccin|malaria|tubercul|pneumonia|sepsis|septic|vir(?:us|al)|"
                  r"bacter"),
    ("diabetes & metabolic", r"diabet|obes|insulin|glyc|lipid|cholesterol|metabolic"),
    ("cardiovascular", r"hypertens|heart|cardi|coronary|atrial|stroke|thromb|vascular|arter|myocard"),
    ("respiratory", r"asthma|pulmonary|copd|lung|cystic fibrosis|bronch|respirat|rhinitis"),
    ("mental health", r"schizo|depress|bipolar|anxiety|attention[- ]deficit|adhd|autis|alcohol|smok|nicotin|opioid|"
                      r"cocaine|substance|insomnia|psych"),
    ("neurological", r"alzheimer|parkinson|epilep|seizure|multiple sclerosis|migraine|dementia|neuropath"),
    ("immune & inflammatory", r"arthritis|psoria|lupus|crohn|colitis|dermatitis|inflammat|spondyl"),
    ("pain", r"pain|analges|an(?:a)?esthe"),
    ("healthy volunteers", r"healthy"),
)
OTHER = "other"
NCT_ID = re.compile(r"NCT\d{8}", re.I)
# The fields a reader can colour the map by; "cluster" is the k-means region.
FIELDS: tuple[str, ...] = ("phase", "condition group", "sex", "age group", "status", "split", "cluster")


def condition_group(conditions: Sequence[str]) -> str:
    """The first of `CONDITION_GROUPS` that one of the conditions matches, else "other"."""
    for name, pattern in CONDITION_GROUPS:
        if any(re.search(pattern, c, re.I) for c in conditions):
            return name
    return OTHER


def age_group(f: TrialFields) -> str:
    """children only / older adults / adults / children and adults / not stated, from the stated age bounds."""
    if f.min_age is None and f.max_age is None:
        return "not stated"
    if render.is_pediatric(f):
        return "children only"
    if render.is_older_adult(f):
        return f"older adults (min age >= {render.OLDER_ADULT_MIN_AGE:g})"
    if f.min_age is not None and f.min_age >= render.ADULT_AGE:
        return "adults"
    return "children and adults"


def colour_fields(f: TrialFields, split: str) -> dict[str, str]:
    """The trial's category in every field of `FIELDS` but "cluster"."""
    return {"phase": f.phase, "condition group": condition_group(f.conditions), "sex": f.sex,
            "age group": age_group(f), "status": f.status, "split": split}


@dataclasses.dataclass(frozen=True)
class ExploreSizes:
    """How much to decode and show; the defaults add about a minute of decoding to the default 135M run on 2 CPUs."""

    clusters: int = 12
    pairs: int = 3  # automatic paths (medoid of one region to the medoid of another) when none are given
    path_steps: int = 5
    concept_trials: int = 2  # trials moved along each concept when none are given
    strengths: tuple[float, ...] = (-1.0, -0.5, 0.0, 0.5, 1.0)
    neighbours: int = 10
    max_new_tokens: int = 96  # Phase, Conditions, Interventions, Ages and Sex lines fit in 96 tokens for most trials
    batch_size: int = 32
    no_repeat_ngram_size: int = 4  # as the evaluation (chosen there on the validation split)
    seed: int = 0

    def __post_init__(self):
        counts = {k: getattr(self, k) for k in ("clusters", "neighbours", "max_new_tokens", "batch_size")}
        bad = {k: v for k, v in counts.items() if v < 1}
        if bad:
            raise ValueError(f"explore sizes must be positive: {bad}")
        if self.path_steps < 2:
            raise ValueError(f"path_steps={self.path_steps}; a path needs at least its two ends.")
        if min(self.pairs, self.concept_trials) < 0:
            raise ValueError(f"pairs={self.pairs}, concept_trials={self.concept_trials}; use 0 for none.")
        if not self.strengths:
            raise ValueError("strengths is empty; give at least one, e.g. (-1, 0, 1).")


@dataclasses.dataclass(frozen=True)
class Region:
    """A k-means cluster: its size, where its centroid lands, what the ELM reads there and what is true there."""

    index: int
    size: int
    xy: tuple[float, float]  # mean map position of its trials (the decoded unit centroid projects further out)
    medoid: str  # NCT id of the member closest to the centroid
    label: str  # the ELM's `describe` text of the (unit) centroid
    majority: dict[str, Any]  # phase, conditions (top 3 with counts), sex, age group: {"value", "share"} each
    agrees: dict[str, bool]  # the label names one of the top-3 conditions / the majority phase


@dataclasses.dataclass(frozen=True)
class Trace:
    """Decoded points along a path (setting "t") or a concept move (setting "strength")."""

    kind: str  # "path" or "concept"
    group: str  # "path", or the concept's name
    name: str
    inputs: tuple[str, ...]
    settings: tuple[float, ...]
    xy: np.ndarray  # (n, 2)
    texts: tuple[str, ...]

    def arrow(self) -> tuple[int, int]:
        """Indices of the points with the lowest and the highest setting (an arrow's tail and head)."""
        order = np.argsort(self.settings, kind="stable")
        return int(order[0]), int(order[-1])


@dataclasses.dataclass(frozen=True)
class Atlas:
    """Everything the page and the PNG draw."""

    ids: list[str]
    texts: list[str]
    xy: np.ndarray  # (n, 2)
    explained: tuple[float, float]  # PCA explained variance ratio of the two axes
    categories: dict[str, list[str]]  # field -> category of each trial
    regions: list[Region]
    traces: list[Trace]
    neighbours: np.ndarray  # (n, k) row indices, most similar first, never the trial itself
    cosines: np.ndarray  # (n, k)
    agreement: dict[str, float]


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm."""
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def fit_projection(embeddings: np.ndarray, seed: int = 0) -> PCA:
    """The 2-D PCA of the unit embeddings (see the module docstring); project anything with `.transform`."""
    return PCA(n_components=2, random_state=seed).fit(unit(embeddings))


def clusters(embeddings: np.ndarray, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(label of each row, unit centroids (k, d)): k-means on the unit embeddings (close to cosine k-means)."""
    x = unit(embeddings)
    if k > len(x):
        raise ValueError(f"--clusters={k} but the corpus has {len(x)} trials; use fewer clusters.")
    km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(x)
    return km.labels_, unit(km.cluster_centers_)


def nearest(queries: np.ndarray, pool: np.ndarray, k: int, exclude: Sequence[int] | None = None,
            chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(indices, cosines) of each query's k most cosine-similar pool rows, best first; `exclude[i]` (a pool row, or
    -1) is never a neighbour of query i."""
    q, p = unit(queries), unit(pool)
    k = min(k, len(p) - (exclude is not None))
    idx = np.zeros((len(q), k), np.int64)
    cos = np.zeros((len(q), k), np.float32)
    for start in range(0, len(q), chunk):
        sims = q[start:start + chunk] @ p.T
        if exclude is not None:
            rows = np.arange(sims.shape[0])
            own = np.asarray(exclude[start:start + chunk])
            sims[rows[own >= 0], own[own >= 0]] = -np.inf
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1), axis=1)
        idx[start:start + chunk], cos[start:start + chunk] = top, np.take_along_axis(sims, top, axis=1)
    return idx, cos


def majority(fields: Sequence[TrialFields]) -> dict[str, Any]:
    """The most common phase, sex and age group (with their shares) and the top 3 conditions (with counts)."""
    def top(values: Sequence[str]) -> dict[str, Any]:
        value, count = collections.Counter(values).most_common(1)[0]
        return {"value": value, "share": round(count / len(values), 3)}

    conditions = collections.Counter(c.lower() for f in fields for c in f.conditions).most_common(3)
    return {"phase": top([f.phase for f in fields]), "conditions": [[c, n] for c, n in conditions],
            "sex": top([f.sex for f in fields]), "age group": top([age_group(f) for f in fields])}


def _line(text: str, name: str) -> str:
    """The value of the text's "Name: value" line, "" if none."""
    return probes.normalise(render.field_lines(text).get(name, ""))


def label_agrees(label: str, truth: Mapping[str, Any]) -> dict[str, bool]:
    """Whether a decoded label's Conditions line names one of `truth`'s top conditions and its Phase line is the
    majority phase."""
    conditions = _line(label, "Conditions")
    named = any(probes.normalise(c) in conditions for c, _ in truth["conditions"]) if conditions else False
    return {"condition": named, "phase": _line(label, "Phase") == probes.normalise(truth["phase"]["value"])}


def agreement(labels: Sequence[str], truths: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Shares of labels agreeing with their own region (see `label_agrees`) and, as chance, with the other regions."""
    own = [label_agrees(lab, t) for lab, t in zip(labels, truths)]
    others = [label_agrees(lab, t) for i, lab in enumerate(labels) for j, t in enumerate(truths) if i != j]
    out = {"regions": len(labels)}
    for key in ("condition", "phase"):
        out[key] = float(np.mean([a[key] for a in own]))
        out[f"{key}_other_regions"] = float(np.mean([a[key] for a in others])) if others else float("nan")
    out["either"] = float(np.mean([a["condition"] or a["phase"] for a in own]))
    return out


def agreement_line(a: Mapping[str, float]) -> str:
    """The agreement figure as one sentence."""
    n = int(a["regions"])
    return (f"region labels: {round(a['condition'] * n)}/{n} name one of their region's top-3 conditions "
            f"(against another region's: {a['condition_other_regions']:.0%}), {round(a['phase'] * n)}/{n} its "
            f"majority phase (another region's: {a['phase_other_regions']:.0%}); {round(a['either'] * n)}/{n} either")


def auto_pairs(medoids: Sequence[int], n: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """n pairs of distinct region medoids (row indices), seeded."""
    if len(medoids) < 2:
        return []
    pairs: list[tuple[int, int]] = []
    for _ in range(n):
        a, b = rng.choice(len(medoids), 2, replace=False)
        pairs.append((int(medoids[a]), int(medoids[b])))
    return pairs


def rows_of(nctids: Sequence[str], ids: Sequence[str]) -> list[int]:
    """Row index of each NCT id; ValueError names the ids the corpus lacks."""
    row = {n.upper(): i for i, n in enumerate(ids)}
    missing = [n for n in nctids if n.strip().upper() not in row]
    if missing:
        raise ValueError(f"NCT ids {missing[:5]} are not in the run's corpus ({len(ids)} trials); check the ids.")
    return [row[n.strip().upper()] for n in nctids]


def build_atlas(model: ELM, tokenizer: Tokenizer, records: Sequence[Mapping], splits: Sequence[str],
                embeddings: np.ndarray, concepts: Mapping[str, concepts_lib.Concept], sizes: ExploreSizes,
                pairs: Sequence[tuple[str, str]] = (), concept_nctids: Sequence[str] = ()) -> Atlas:
    """The atlas of a corpus (records row-aligned with `splits` and `embeddings`); every decode in one batched call.

    `pairs` (NCT id pairs) default to `sizes.pairs` pairs of region medoids; `concept_nctids` to
    `sizes.concept_trials` seeded trials; every concept in `concepts` moves each of them by `sizes.strengths`."""
    rng = np.random.default_rng(sizes.seed)
    ids = [r["nctid"] for r in records]
    fields = [render.fields(r) for r in records]
    x = unit(embeddings)
    projection = fit_projection(x, sizes.seed)
    labels, centroids = clusters(x, sizes.clusters, sizes.seed)
    medoids = [int(np.flatnonzero(labels == c)[np.argmax(x[labels == c] @ centroids[c])])
               for c in range(len(centroids))]

    describe = prompts.describe_prompt(tokenizer)
    jobs = [decode.Job((f"region {c}",), describe, centroids[c][None], {}) for c in range(len(centroids))]
    path_rows = [tuple(rows_of(p, ids)) for p in pairs] or auto_pairs(medoids, sizes.pairs, rng)
    spans: list[tuple[str, str, str, tuple[str, ...], str, list[decode.Job]]] = []
    for a, b in path_rows:
        path = decode.make_jobs("interpolate", tokenizer, [ids[a], ids[b]], x[[a, b]], steps=sizes.path_steps)
        spans.append(("path", "path", f"{ids[a]} → {ids[b]}", (ids[a], ids[b]), "t", path))
    moved = rows_of(concept_nctids, ids) if concept_nctids else \
        [int(i) for i in rng.choice(len(ids), min(sizes.concept_trials, len(ids)), replace=False)]
    for concept in concepts.values():
        for i in moved:
            move = decode.make_jobs("concept", tokenizer, [ids[i]], x[i][None], strengths=sizes.strengths,
                                    concept=concept)
            spans.append(("concept", concept.name, f"{concept.name}: {ids[i]}", (ids[i],), "strength", move))
    all_jobs = jobs + [j for *_, span in spans for j in span]
    config = prompts.sampling_config(tokenizer, sizes.max_new_tokens, sizes.batch_size,
                                     no_repeat_ngram_size=sizes.no_repeat_ngram_size)
    texts = [r["text"] for r in decode.decode_jobs(model, tokenizer, all_jobs, config, sizes.seed)]

    truths = [majority([fields[i] for i in np.flatnonzero(labels == c)]) for c in range(len(centroids))]
    xy = projection.transform(x)
    region_xy = [xy[labels == c].mean(axis=0) for c in range(len(centroids))]  # the raw centroid's projection
    regions = [Region(c, int((labels == c).sum()), (float(region_xy[c][0]), float(region_xy[c][1])), ids[medoids[c]],
                      texts[c], truths[c], label_agrees(texts[c], truths[c])) for c in range(len(centroids))]
    traces, at = [], len(jobs)
    for kind, group, name, inputs, key, span in spans:
        vectors = np.stack([j.vectors[0] for j in span])
        traces.append(Trace(kind, group, name, inputs, tuple(float(j.setting[key]) for j in span),
                            projection.transform(vectors), tuple(texts[at:at + len(span)])))
        at += len(span)

    categories: dict[str, list[str]] = collections.defaultdict(list)
    for f, split in zip(fields, splits):
        for field, value in colour_fields(f, split).items():
            categories[field].append(value)
    categories["cluster"] = [f"region {c}" for c in labels]
    neighbours, cosines = nearest(x, x, sizes.neighbours, exclude=range(len(x)))
    return Atlas(ids, [render.render_text(r) for r in records], xy,
                 tuple(float(v) for v in projection.explained_variance_ratio_), dict(categories), regions, traces,
                 neighbours, cosines, agreement(texts[:len(jobs)], truths))


def search(query: str, ids: Sequence[str], embeddings: np.ndarray,
           encode: Callable[[Sequence[str]], np.ndarray] | None, k: int = 10,
           no_encoder: str = "no encoder was given") -> list[tuple[int, float]]:
    """(row, cosine) of the k trials nearest to an NCT id of the corpus (itself left out) or to a text embedded with
    `encode` (the run's encoder; None when the run has none, for the reason `no_encoder`: then only NCT ids work)."""
    query = query.strip()
    if not query:
        raise ValueError("--search is empty; give an NCT id of the corpus or a text.")
    row = {n.upper(): i for i, n in enumerate(ids)}
    if query.upper() in row:
        i = row[query.upper()]
        idx, cos = nearest(embeddings[i][None], embeddings, k, exclude=[i])
    elif NCT_ID.fullmatch(query):
        raise ValueError(f"{query} is not in the run's corpus ({len(ids)} trials); search by text instead.")
    elif encode is None:
        raise ValueError(f"searching by text needs the run's sentence encoder, but {no_encoder}; search by NCT id "
                         f"instead, e.g. --search={ids[0]}.")
    else:
        idx, cos = nearest(encode([query]), embeddings, k)
    return [(int(i), float(c)) for i, c in zip(idx[0], cos[0])]
