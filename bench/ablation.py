"""Ablation of ctELM's recipe on the default budget (issue 13): each variant trains the recipe as it was ablated
(`full`: `configs/default.py` at k = 1 soft token per embedding and with the word-concept task, weights 0.2 and 0.05
in the concept and control stages) with one part taken out or changed, for the same steps and seeds, and is evaluated
on the validation split. `default` is `configs/default.py` as shipped, chosen on these rows (k = 4, no word-concept
task).

    .venv/bin/python bench/ablation.py --variant=describe_only [--root=runs/ablation] [--embeddings=runs/default]
    .venv/bin/python bench/ablation.py --variant=default --reuse=runs/default  # evaluate a finished run of a variant
    .venv/bin/python bench/ablation.py --table                               # the markdown table of every variant
    .venv/bin/python bench/ablation.py --pair=default,counterfactual         # B against A, paired over the trials

Each variant's run is `<root>/<variant>` (or the `--reuse` run, left as it is); it reads the corpus embeddings of
`--embeddings` (a run that has them, through `data.embeddings`) so that no variant spends the encoder's minutes again.
The evaluation leaves out the re-ranked row (same greedy decoding, minutes cheaper); its metrics go to
`<root>/<variant>/eval/metrics.json`.
Results go to BENCHMARKS.md by hand, with the machine and the date.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.recipes import VARIANTS  # noqa: E402
from configs.default import get_config  # noqa: E402
from ctelm_jax.eval import facts, probes  # noqa: E402
from ctelm_jax.eval.suite import EvalSizes, evaluate_run  # noqa: E402
from ctelm_jax.train.loop import train  # noqa: E402


_VARIANT = flags.DEFINE_enum("variant", None, list(VARIANTS), "The variant to train and evaluate.")
_ROOT = flags.DEFINE_string("root", "runs/ablation", "Folder of the variants' runs.")
_EMBEDDINGS = flags.DEFINE_string("embeddings", "runs/default", "A run whose embeddings/corpus the variants read.")
_REUSE = flags.DEFINE_string("reuse", "", "A finished run of this variant's config to evaluate instead of training.")
_TABLE = flags.DEFINE_bool("table", False, "Print the table of the evaluated variants and exit.")
_RESCORE = flags.DEFINE_string("rescore", "", "An evaluated variant whose concept curves are scored again from its "
                                "samples with today's scorer (metrics.json rewritten), then exit.")
_PAIR = flags.DEFINE_list("pair", [], "Two evaluated variants, A,B: print B - A paired over the same trials and exit.")
_N_TEST = flags.DEFINE_integer("n_test", 32, "Validation trials to describe.")
_N_CONCEPT = flags.DEFINE_integer("n_concept", 24, "Validation trials per concept and strength.")


def _net_push(curves: dict) -> float:
    """Share of trials moved with the push minus against it, averaged over every concept and strength != 0: about 0
    when the decoded age / sex changes with the move no more often than against it."""
    cells = [(r["toward"] - r["away"]) * (1 if r["strength"] > 0 else -1)
             for curve in curves.values() for r in curve["curve"] if r["strength"] != 0]
    return sum(cells) / len(cells)


def _row(name: str, m: dict) -> str:
    """One markdown row of a variant's validation metrics."""
    elm = m["describe"]["ELM"]
    cells = [VARIANTS[name][0], f"{elm['cosine']['mean']:.3f}", f"{elm['facts']['key_facts']:.2f}"]
    for concept in ("age", "sex", "pediatric"):
        curve = m["concepts"]["curves"].get(concept)
        if curve is None:
            cells.append("-")
            continue
        by_s = {r["strength"]: r["share"] for r in curve["responsive"]}
        cells.append(f"{by_s.get(-1.0, math.nan):.2f} / {by_s.get(1.0, math.nan):.2f} ({curve['shape']})")
    cells.append(f"{_net_push(m['concepts']['curves']):+.3f}")
    novel = m["novel"]
    cells.append(f"{sum(v['well_formed'] * v['n'] for v in novel.values()) / sum(v['n'] for v in novel.values()):.2f}")
    pred = m.get("embed_prediction")
    cells.append(f"{pred['ELM']['mean']:.3f}" if pred else "-")
    return "| " + " | ".join(cells) + " |"


def table(root: Path) -> str:
    """Markdown table of every variant evaluated under `root`."""
    head = ("| variant | re-embed cos | key facts | age -1 / +1 | sex -1 / +1 | pediatric -1 / +1 "
            "| with - against push | novel well-formed | cos(predicted, encoder) |\n" + "|---" * 9 + "|")
    rows = [_row(name, json.loads((root / name / "eval" / "metrics.json").read_text()))
            for name in VARIANTS if (root / name / "eval" / "metrics.json").is_file()]
    return "\n".join([head, *rows])


def _mean_se(x: list[float]) -> str:
    """'mean ± standard error'."""
    a = np.asarray(x, np.float64)
    return f"{a.mean():+.3f} ± {a.std(ddof=1) / math.sqrt(len(a)):.3f}"


def _moved(curves: dict, concept: str) -> str:
    """'-1: k/n, +1: k/n, specificity s' of one concept's curve; '-' without it."""
    c = curves.get(concept)
    if c is None:
        return "-"
    by_s = {r["strength"]: r for r in c["responsive"]}
    return (f"{by_s[-1.0]['k']}/{by_s[-1.0]['n']} / {by_s[1.0]['k']}/{by_s[1.0]['n']} ({c['shape']}); "
            f"specific {c['specificity']:.0%}")


def paired(root: Path, a: str, b: str) -> str:
    """Markdown of variant b against variant a on the same validation trials: per-trial differences (mean ± standard
    error) of re-embed cosine and key facts, the describe Ages / Sex lines, attribute answers and concept moves."""
    m = {v: json.loads((root / v / "eval" / "metrics.json").read_text()) for v in (a, b)}
    samples = {v: [json.loads(line) for line in (root / v / "eval" / "samples.jsonl").read_text().splitlines()]
               for v in (a, b)}
    elm = {v: m[v]["describe"]["ELM"] for v in (a, b)}
    ids = {v: [s["nctid"] for s in samples[v] if s["task"] == "describe" and s["system"] == "ELM"] for v in (a, b)}
    if ids[a] != ids[b]:
        raise SystemExit(f"{a} and {b} were evaluated on other trials; evaluate both with the same sizes.")
    truths = [s["truth"] for s in samples[a] if s["task"] == "describe" and s["system"] == "ELM"]
    texts = {v: [s["text"] for s in samples[v] if s["task"] == "describe" and s["system"] == "ELM"] for v in (a, b)}
    keys = {v: [facts.score(t, truth)["key_facts"] for t, truth in zip(texts[v], truths)] for v in (a, b)}
    lines = [f"Paired over the same {len(truths)} validation trials ({b} minus {a}, mean ± standard error): re-embed "
             f"cosine {_mean_se(np.subtract(elm[b]['cosines'], elm[a]['cosines']).tolist())}, key facts "
             f"{_mean_se(np.subtract(keys[b], keys[a]).tolist())}.", "",
             "| | " + " | ".join((a, b)) + " |", "|---|---|---|"]

    def row(name: str, cell: Callable[[str], str]) -> None:
        lines.append(f"| {name} | " + " | ".join(cell(v) for v in (a, b)) + " |")

    row("re-embed cosine", lambda v: f"{elm[v]['cosine']['mean']:.3f}")
    row("key facts", lambda v: f"{elm[v]['facts']['key_facts']:.0%}")
    row("well-formed", lambda v: f"{elm[v]['well_formed']:.0%}")
    for line in ("ages", "sex"):
        row(f"describe {line.capitalize()} line (neighbour / majority)", lambda v, line=line: "{ELM:.0%} ({nn:.0%} / "
            "{majority:.0%})".format(nn=m[v]["describe_lines"][line]["nearest training neighbour"],
                                     majority=m[v]["describe_lines"][line]["majority line"],
                                     ELM=m[v]["describe_lines"][line]["ELM"]))
        row(f"{line} answers exact (majority)", lambda v, line=line: (
            f"{m[v]['attributes'][line]['exact']:.0%} ({m[v]['attributes'][line]['majority']:.0%})"))
    for method in ("edit_pair", "centroid"):
        for concept in ("age", "sex", "pediatric"):
            row(f"{concept}, {method} vectors: moved with the push at -1 / +1",
                lambda v, method=method, concept=concept: _moved(
                    m[v]["concepts"].get("by_method", {}).get(method, {}).get("curves", {}), concept))
    return "\n".join(lines)


def rescore(out: Path) -> None:
    """The concept curves of an evaluation (`out`: its folder) scored again from its decoded samples with today's
    `probes.concept_curve`, written into its metrics.json: texts are kept, only the scores change."""
    metrics_path = out / "metrics.json"
    m = json.loads(metrics_path.read_text())
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    concept_samples = [s for s in samples if s["task"] == "concept"]
    strengths = sorted({*map(float, m["sizes"]["strengths"]), 0.0})
    base = [s["text"] for s in concept_samples if s["strength"] == 0.0]
    for method, found in m["concepts"]["by_method"].items():
        for name in found["curves"]:
            texts = {s: [x["text"] for x in concept_samples
                         if x.get("vectors") == method and x["concept"] == name and x["strength"] == s]
                     for s in strengths if s != 0.0}
            found["curves"][name] = probes.concept_curve(name, strengths, {**texts, 0.0: base})
    m["concepts"]["curves"] = m["concepts"]["by_method"][m["concepts"]["method"]]["curves"]
    metrics_path.write_text(json.dumps(m, indent=1) + "\n")


def main(argv: list[str]) -> None:
    """Trains and evaluates one variant, or prints the table."""
    del argv
    root = Path(_ROOT.value)
    if _TABLE.value:
        print(table(root))
        return
    if _RESCORE.value:
        rescore(root / _RESCORE.value / "eval")
        return
    if _PAIR.value:
        print(paired(root, *_PAIR.value))
        return
    if _VARIANT.value is None:
        raise app.UsageError("give --variant (one of " + ", ".join(VARIANTS) + ") or --table.")
    workdir = Path(_REUSE.value) if _REUSE.value else root / _VARIANT.value
    start = time.time()
    if not _REUSE.value:
        config = get_config()
        VARIANTS[_VARIANT.value][1](config)
        config.data.embeddings = str(Path(_EMBEDDINGS.value) / "embeddings" / "corpus")  # read, not recomputed
        summary = train(config, workdir)
        if summary["status"] != "finished":
            raise SystemExit(f"training {summary['status']} at step {summary.get('step')}; rerun to resume.")
    trained_s = time.time() - start
    evaluate_run(workdir, EvalSizes(split="validation", rerank_candidates=0, n_test=_N_TEST.value,
                                    n_concept=_N_CONCEPT.value), out=root / _VARIANT.value / "eval")
    evaluated_s = time.time() - start - trained_s
    print(f"{_VARIANT.value}: trained in {trained_s / 60:.1f} min, evaluated in {evaluated_s / 60:.1f} min")
    print(table(root))


if __name__ == "__main__":
    app.run(main)
