"""Is it the method or the budget? (issue 28, item 4): one run of a recipe (`bench/recipes.py`, `default` by default)
with every stage scaled so that the curriculum ends at the last of `--steps`, evaluated on the validation split at each
of `--steps` (the same trials at every step), and the slope of re-embed cosine against log2(steps).

    .venv/bin/python bench/learning_curve.py [--variant=default] [--steps=100,200,400,800] [--root=runs/curve]
        [--embeddings=runs/default] [--n_test=64] [--n_concept=32]
    .venv/bin/python bench/learning_curve.py --table [--variant=default]   # the table, the fit and the plot

The run is `<root>/<variant>` with a checkpoint every `gcd(--steps)` steps, all kept; rerun the same command after an
interruption: training resumes and finished evaluations (`<root>/<variant>/eval_<step>/metrics.json`) are kept. The
stages keep their proportions (the default's 200 / 100 / 100 become 400 / 200 / 200 for 800 steps), so the early
points are the alignment stage's, not those of shorter runs of the whole curriculum. Results go to BENCHMARKS.md by
hand, with the machine and the date.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.recipes import VARIANTS  # noqa: E402
from configs.default import get_config  # noqa: E402
from ctelm_jax.eval.suite import EvalSizes, evaluate_run  # noqa: E402
from ctelm_jax.train.loop import train  # noqa: E402

_VARIANT = flags.DEFINE_enum("variant", "default", list(VARIANTS), "The recipe to train.")
_STEPS = flags.DEFINE_list("steps", ["100", "200", "400", "800"], "Steps to evaluate at; the last ends the run.")
_ROOT = flags.DEFINE_string("root", "runs/curve", "Folder of the runs.")
_EMBEDDINGS = flags.DEFINE_string("embeddings", "runs/default", "A run whose embeddings/corpus the run reads.")
_N_TEST = flags.DEFINE_integer("n_test", 64, "Validation trials to describe at each step.")
_N_CONCEPT = flags.DEFINE_integer("n_concept", 32, "Validation trials per concept and strength at each step.")
_TABLE = flags.DEFINE_bool("table", False, "Print the table and the fit of the evaluated steps, plot them, exit.")


def scaled_stages(stages: list[dict], total: int) -> list[dict]:
    """The stages with their steps scaled to sum to `total` (rounded; the last takes the remainder)."""
    old = sum(int(s["steps"]) for s in stages)
    out, used = [], 0
    for i, s in enumerate(stages):
        steps = total - used if i == len(stages) - 1 else max(1, round(int(s["steps"]) * total / old))
        out.append({**s, "steps": steps})
        used += steps
    return out


def _share(curves: dict, concept: str) -> float:
    """Share of trials moved with the push, averaged over strengths -1 and +1."""
    c = curves.get(concept)
    if c is None:
        return math.nan
    return float(np.mean([r["share"] for r in c["responsive"] if abs(r["strength"]) == 1.0]))


def row(step: int, m: dict) -> dict[str, float]:
    """The curve's numbers at one step."""
    elm, lines, curves = m["describe"]["ELM"], m["describe_lines"], m["concepts"]["curves"]
    return {"step": step, "cosine": elm["cosine"]["mean"], "cosine_se": elm["cosine"]["std"] / math.sqrt(
        elm["cosine"]["n"]), "neighbour": m["describe"]["nearest training neighbour"]["cosine"]["mean"],
            "key_facts": elm["facts"]["key_facts"], "ages_line": lines["ages"]["ELM"], "sex_line": lines["sex"]["ELM"],
            "age_moved": _share(curves, "age"), "sex_moved": _share(curves, "sex"),
            "specificity": float(np.nanmean([c["specificity"] for c in curves.values()])) if curves else math.nan}


def fit(rows: list[dict]) -> str:
    """Least-squares line of re-embed cosine on log2(step), its slope's standard error, and where it would meet the
    nearest neighbour's cosine (with the range the slope's ±1 standard error gives)."""
    if len(rows) < 3:
        return "fewer than 3 points: no fit."
    x = np.log2([r["step"] for r in rows])
    y = np.asarray([r["cosine"] for r in rows])
    a = np.vstack([x, np.ones_like(x)]).T
    (slope, intercept), *_ = np.linalg.lstsq(a, y, rcond=None)
    resid = y - a @ np.array([slope, intercept])
    se = math.sqrt(float(resid @ resid) / (len(x) - 2) / float(((x - x.mean()) ** 2).sum()))
    target = float(np.mean([r["neighbour"] for r in rows]))
    reach = []
    for s in (slope + se, slope, slope - se):
        reach.append(f"{2 ** ((target - intercept) / s):,.0f}" if s > 0 else "never")
    return (f"re-embed cosine = {intercept:.3f} + {slope:.4f} (± {se:.4f}) x log2(step); the nearest neighbour's "
            f"{target:.3f} would be met at step {reach[1]} (slope ± 1 s.e.: {reach[0]} to {reach[2]}), if the line "
            "held that far.")


def table(root: Path) -> str:
    """Markdown table of the evaluated steps, the fit, and `curve.png` beside the metrics."""
    found = sorted((int(p.parent.name.split("_")[1]), p) for p in root.glob("eval_*/metrics.json"))
    rows = [row(step, json.loads(p.read_text())) for step, p in found]
    head = ("| step | re-embed cos (± s.e.) | key facts | Ages line | Sex line | age moved (±1) | sex moved (±1) | "
            "specificity |\n" + "|---" * 8 + "|")
    lines = [f"| {r['step']} | {r['cosine']:.3f} ± {r['cosine_se']:.3f} | {r['key_facts']:.0%} | {r['ages_line']:.0%} "
             f"| {r['sex_line']:.0%} | {r['age_moved']:.0%} | {r['sex_moved']:.0%} | {r['specificity']:.0%} |"
             for r in rows]
    if rows:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        steps = [r["step"] for r in rows]
        ax.errorbar(steps, [r["cosine"] for r in rows], yerr=[r["cosine_se"] for r in rows], marker="o", label="ELM")
        ax.plot(steps, [r["neighbour"] for r in rows], "--", label="nearest training neighbour")
        ax.plot(steps, [r["key_facts"] for r in rows], marker="s", label="key facts (share)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("training step")
        ax.set_ylabel("validation re-embed cosine / share")
        ax.legend()
        fig.tight_layout()
        fig.savefig(root / "curve.png", dpi=120)
    return "\n".join([head, *lines, "", fit(rows)])


def main(argv: list[str]) -> None:
    """Trains the scaled recipe (resuming), evaluates each step not yet evaluated, prints the table."""
    del argv
    root = Path(_ROOT.value) / _VARIANT.value
    if _TABLE.value:
        print(table(root))
        return
    steps = sorted(int(s) for s in _STEPS.value)
    config = get_config()
    VARIANTS[_VARIANT.value][1](config)
    config.stages = scaled_stages([dict(s) for s in config.stages], steps[-1])
    config.checkpoint.every_steps = math.gcd(*steps)
    config.checkpoint.keep = steps[-1] // config.checkpoint.every_steps + 1  # every checkpoint kept
    config.data.embeddings = str(Path(_EMBEDDINGS.value) / "embeddings" / "corpus")
    summary = train(config, root)
    if summary["status"] != "finished":
        raise SystemExit(f"training {summary['status']} at step {summary.get('step')}; rerun to resume.")
    sizes = EvalSizes(split="validation", rerank_candidates=0, n_test=_N_TEST.value, n_concept=_N_CONCEPT.value)
    for step in steps:
        if not (root / f"eval_{step}" / "metrics.json").is_file():
            evaluate_run(root, sizes, step=step, out=root / f"eval_{step}")
    print(table(root))


if __name__ == "__main__":
    app.run(main)
