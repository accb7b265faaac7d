"""The evaluation report: markdown tables (describe, facts, attributes, concepts, novel vectors), PNG plots (cosine
histogram, concept curves) and all decoded samples."""

from __future__ import annotations

import json
from etils.epath import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ctelm_jax.eval.probes import CURVE_GROUPS  # noqa: E402

COSINE_PNG, CONCEPTS_PNG, REPORT_MD, SAMPLES_JSONL = "cosine_hist.png", "concept_curves.png", "report.md", \
    "samples.jsonl"


def _stat(s: dict[str, float] | None, digits: int = 3) -> str:
    """'mean ± std' of a metrics.summary, or n/a."""
    if not s or not s.get("n"):
        return "n/a"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def describe_table(results: dict[str, Any]) -> str:
    """The main table: each system's re-embed cosine, ROUGE-L, BLEU, share of well-formed texts and, for the decoded
    ones, seconds per text."""
    lines = ["| system | re-embed cosine | ROUGE-L | BLEU | well-formed | s / text |", "|---|---|---|---|---|---|"]
    for name, row in results["describe"].items():
        label = f"ELM (step {results['step']})" if name == "ELM" else name
        seconds = f"{row['seconds_per_text']:.2f}" if "seconds_per_text" in row else "-"
        lines.append(f"| {label} | {_stat(row.get('cosine'))} | {_stat(row['rouge_l'])} | {row['bleu']:.1f} | "
                     f"{row['well_formed']:.0%} | {seconds} |")
    return "\n".join(lines)


def describe_verdict(results: dict[str, Any], system: str = "ELM") -> str:
    """One sentence part per other system: `system`'s mean re-embed cosine minus that system's, and on how many of
    the same trials `system`'s text is the closer one (the ELM's sentence leaves out its re-ranked row, which has
    its own)."""
    rows = results["describe"]
    ours = rows.get(system, {}).get("cosines")
    if not ours:
        return "No re-embed cosines (no encoder): no comparison with the baselines."
    skip = {system}
    if system == "ELM" and results.get("rerank"):
        skip.add(results["rerank"]["system"])
    ours = np.asarray(ours)
    parts = []
    for name, row in rows.items():
        theirs = row.get("cosines")
        if name in skip or not theirs or len(theirs) != len(ours):
            continue
        theirs = np.asarray(theirs)
        delta = float(ours.mean() - theirs.mean())
        word = "above" if delta > 0 else "below"
        parts.append(f"{abs(delta):.3f} {word} the {name} ({system} closer on {int((ours > theirs).sum())}/"
                     f"{len(ours)} trials)")
    return f"{system} re-embed cosine {ours.mean():.3f}: " + "; ".join(parts) + "."


def rerank_note(results: dict[str, Any]) -> str:
    """What the re-ranked row is, how often it kept the greedy text, and its verdict (`results["rerank"]` set)."""
    info = results["rerank"]
    k = len(info["chosen"])
    return (f"{info['system']}: the ELM's greedy text and {info['candidates'] - 1} texts sampled at temperature "
            f"{info['temperature']}, top-p {info['top_p']} (seed {info['seed']}), each re-embedded by the encoder; "
            f"the one closest to the input embedding is kept (the greedy text on {info['greedy_kept']}/{k} trials). "
            f"Its s / text includes the greedy decode. {describe_verdict(results, info['system'])}")


def revise_note(results: dict[str, Any]) -> str:
    """Per revised row: the share of kept texts equal to their draft and the mean re-embed cosine round by round."""
    out = []
    for name, info in results["revise"].items():
        by_round = ", ".join(f"round {r}: {c:.3f}" for r, c in enumerate(info["round_cosines"], 1))
        out.append(f"{name}: each draft revised round after round (`revise`), the round whose text re-embeds closest "
                   f"kept (never the draft); kept texts equal to their draft: {info['equal_to_draft']:.0%}; mean "
                   f"re-embed cosine of the draft {info['draft_cosine']:.3f}, {by_round}.")
    return "\n\n".join(out)


def facts_table(results: dict[str, Any]) -> str:
    """Fact scores of each system's describe texts (`eval.facts`): key fields, terms, numbers, logic."""
    lines = ["| system | key facts | phase | conditions | interventions | ages exact | ages ±5 y | sex | status | "
             "conditions F1 | interventions F1 | logic (items) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in results["describe"].items():
        f = row["facts"]
        label = f"ELM (step {results['step']})" if name == "ELM" else name
        logic = "n/a (0)" if not f["logic_n"] else f"{f['logic']:.0%} ({f['logic_n']})"
        lines.append(f"| {label} | {f['key_facts']:.0%} | {f['phase']:.0%} | {f['conditions']:.0%} | "
                     f"{f['interventions']:.0%} | {f['ages']:.0%} | {f['ages_within']:.0%} | {f['sex']:.0%} | "
                     f"{f['status']:.0%} | {f['conditions_f1']:.2f} | {f['interventions_f1']:.2f} | {logic} |")
    return "\n".join(lines)


def _share_ci(share: float, ci: list[float]) -> str:
    """'50% [24%, 76%]'."""
    return f"{share:.0%} [{ci[0]:.0%}, {ci[1]:.0%}]"


def _attribute_table(attributes: dict[str, dict[str, float]]) -> str:
    lines = ["| attribute | exact | exact or right field line | overlap (lists) | majority-answer baseline | n |",
             "|---|---|---|---|---|---|"]
    for name, row in attributes.items():
        lines.append(f"| {name} | {row['exact']:.0%} | {row['field']:.0%} | {row['overlap']:.0%} | "
                     f"{row.get('majority', float('nan')):.0%} | {row['n']} |")
    return "\n".join(lines)


def lines_table(results: dict[str, Any]) -> str:
    """The describe texts' Ages and Sex lines right, per system and for always writing the majority line."""
    lines_ = results["describe_lines"]
    systems = list(lines_["sex"])
    out = ["| line | " + " | ".join(systems) + " |", "|---" * (len(systems) + 1) + "|"]
    out += [f"| {line} | " + " | ".join(f"{row[s]:.0%}" for s in systems) + " |" for line, row in lines_.items()]
    return "\n".join(out)


def _concept_table(curves: dict[str, Any], definitions: dict[str, Any], split: str) -> str:
    lines = []
    for name, c in curves.items():
        d = definitions[name]
        moved = "; ".join(f"{r['strength']:+.2f}: {r['k']}/{r['n']} = {_share_ci(r['share'], r['ci'])}"
                          for r in c["responsive"])
        kept = "; ".join(f"{r['strength']:+.2f}: {_share_ci(r['specific'], r['specific_ci'])}" for r in c["responsive"])
        lines += [f"**{name}** ({d['description']}; {d['positive']} vs {d['negative']} training trials; "
                  f"{c['n']} {split} trials; net shift against strength: {c['shape']})", "",
                  f"Moved with the push (95% Wilson interval): {moved}.", "",
                  f"Specificity, phase, conditions and interventions as at strength 0 (95% Wilson interval): {kept}; "
                  f"mean {c['specificity']:.0%}.", "",
                  "| strength | parsed | toward [95% CI] | away [95% CI] | net | in positive group | in negative group "
                  "| mean score |", "|---|---|---|---|---|---|---|---|"]
        for r in c["curve"]:
            lines.append(f"| {r['strength']:+.2f} | {r['parsed']:.0%} | {_share_ci(r['toward'], r['toward_ci'])} | "
                         f"{_share_ci(r['away'], r['away_ci'])} | {r['net']:+.2f} | {r['positive']:.0%} | "
                         f"{r['negative']:.0%} | {r['mean_score']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def _novel_table(novel: dict[str, Any]) -> str:
    lines = ["| vectors | n | well-formed | re-embed cosine to the vector |", "|---|---|---|---|"]
    for name, row in novel.items():
        lines.append(f"| {name} | {row['n']} | {row['well_formed']:.0%} | {_stat(row.get('cosine'))} |")
    return "\n".join(lines)


def _save_png(fig: Any, path: Path) -> None:
    """Writes a figure as PNG through the path's own file (so gs:// works), then closes it."""
    fig.tight_layout()
    with path.open("wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def plot_cosines(results: dict[str, Any], path: Path) -> bool:
    """Histogram of re-embed cosines per system; False (nothing written) without cosines."""
    series = {name: row["cosines"] for name, row in results["describe"].items() if "cosines" in row}
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in series.items():
        ax.hist(values, bins=24, range=(-0.2, 1.0), histtype="step", linewidth=1.8, label=name)
    ax.set_xlabel("cosine(encoder(text), input embedding)")
    ax.set_ylabel("trials")
    ax.set_title(f"Re-embed cosine on {results['split']} (step {results['step']})")
    ax.legend()
    _save_png(fig, path)
    return True


def plot_concepts(results: dict[str, Any], path: Path) -> bool:
    """Net shift, share moved toward the concept (with its Wilson interval) and group shares against strength, one
    panel per concept; False without curves."""
    curves = results["concepts"]["curves"]
    if not curves:
        return False
    fig, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 3.6), squeeze=False)
    for ax, (name, c) in zip(axes[0], curves.items()):
        s = [r["strength"] for r in c["curve"]]
        positive, negative = CURVE_GROUPS[name]
        for key, style, label in (("net", "o-", "net shift"), ("positive", "s--", f"share {positive}"),
                                  ("negative", "^:", f"share {negative}")):
            ax.plot(s, [r[key] for r in c["curve"]], style, label=label)
        toward = np.array([r["toward"] for r in c["curve"]])
        ci = np.array([r["toward_ci"] for r in c["curve"]])
        ax.errorbar(s, toward, yerr=np.clip([toward - ci[:, 0], ci[:, 1] - toward], 0.0, None), fmt="x-", capsize=3,
                    label="moved toward (95% CI)")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_title(f"{name} ({c['shape']})")
        ax.set_xlabel("strength")
        ax.set_ylim(-1.05, 1.05)
        ax.legend(fontsize=8)
    _save_png(fig, path)
    return True


def markdown(results: dict[str, Any], cosine_png: bool, concepts_png: bool) -> str:
    """The report's markdown."""
    sizes = results["sizes"]
    parts = [
        f"# Evaluation of {results['workdir']} (step {results['step']}, {results['split']} split)", "",
        f"Encoder for re-embedding: {results['encoder']}. Greedy decoding, repetition penalty "
        f"{sizes['repetition_penalty']}, no-repeat n-gram size {sizes.get('no_repeat_ngram_size', 0)} (0 = off).", "",
        f"## Describe ({sizes['n_test']} trials, up to {sizes['max_new_tokens']} new tokens)", "",
        describe_table(results), "",
        describe_verdict(results), "",
        *([rerank_note(results), ""] if results.get("rerank") else []),
        *([revise_note(results), ""] if results.get("revise") else []),
        "ELM: the checkpoint. Untrained adapter: the same pretrained decoder with the run's freshly initialised "
        "adapter and LoRA at initialisation (a no-op), i.e. the model at step 0. Nearest training neighbour: the text "
        "of the most similar training embedding (retrieval). ROUGE-L / BLEU against the true canonical text; "
        "well-formed: `render.parse_text` accepts it. s / text: wall time of the system's describe decodes over the "
        "number of trials (the untrained adapter's includes compiling the greedy decode, which the ELM's reuses; the "
        "re-ranked row's includes its greedy decode, compiling the sampled one, the samples and their re-embedding).",
        "",
    ]
    if cosine_png:
        parts += [f"![re-embed cosine]({COSINE_PNG})", ""]
    parts += ["## Facts", "", facts_table(results), "",
              "Each text read line by line against the true canonical text (`eval.facts`; a missing or unreadable "
              "line is wrong). Key facts: share of phase, conditions, interventions (the same items), age bounds "
              "(both exact), sex and status right. Conditions / interventions F1: item F1 (case and whitespace "
              "normalised). Ages ±5 y: each bound within 5 years (an open bound matches only an open one). Logic: of "
              "the true criteria items the text states (token F1 >= 0.5), the share under the right heading "
              "(inclusion vs exclusion), pooled over trials (items found).", ""]
    if results.get("describe_lines"):
        parts += ["Ages and Sex lines of the describe texts right, beside writing the training split's most common "
                  "line for every trial:", "", lines_table(results), ""]
    parts += [f"## Attributes ({sizes['n_attribute']} trials, `attributes` task prompts)", "",
              _attribute_table(results["attributes"]), "",
              "Exact: the answer is the canonical value of the field. Right field line: also counts answers written "
              "as (part of) a trial text whose line for the field is right.", "",
              "## Concept responsiveness", "",
              f"Concept vectors {results['concepts']['source']}. Each test embedding is moved by strength x vector "
              "and renormalised, then described. Age score: midpoint of the decoded age range (open ends 0 and 100 "
              "years); sex score: women +1, all 0, men -1; toward/away: the score moved in/against the concept's "
              "direction compared with strength 0; net = toward - away (monotone: net never decreases with strength). "
              "Moved with the push: toward the concept at a positive strength, away from it at a negative one.", ""]
    by_method = results["concepts"].get("by_method") or {
        "run's": {"curves": results["concepts"]["curves"], "definitions": results["concepts"]["definitions"]}}
    for method, found in by_method.items():
        parts += [f"### {method} vectors" + (" (the run's)" if method == results["concepts"].get("method") else ""),
                  "", _concept_table(found["curves"], found["definitions"], results["split"])]
    if results["concepts"].get("other"):
        parts += [f"({results['concepts']['other']}.)", ""]
    if concepts_png:
        parts += [f"![concept curves]({CONCEPTS_PNG})", ""]
    if results.get("embed_prediction"):
        parts += ["## Embedding prediction (text -> vector)", "",
                  "cos(predicted, encoder): the ELM's embedding-prediction head on the true canonical text of each "
                  "test trial, against the encoder's embedding of it; training mean: the mean training embedding "
                  "as the prediction for every trial (what knowing nothing of the text gives).", "",
                  "| predictor | cos (mean ± std) | median | n |", "|---|---|---|---|"]
        parts += [f"| {name} | {_stat(row)} | {row['median']:.3f} | {row['n']} |"
                  for name, row in results["embed_prediction"].items()] + [""]
    parts += ["## Novel vectors", "",
              "Gaussian: draws from a Gaussian fitted to the training embeddings, renormalised. Midpoint: normalised "
              "mean of two random training embeddings.", "", _novel_table(results["novel"]), "",
              "## Time (s)", "", ", ".join(f"{k}: {v}" for k, v in results["timings_s"].items()), ""]
    return "\n".join(parts)


def write(out_dir: Path, results: dict[str, Any], samples: list[dict[str, Any]]) -> str:
    """Writes report.md, the plots and samples.jsonl into `out_dir`; returns the markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text = markdown(results, plot_cosines(results, out_dir / COSINE_PNG),
                    plot_concepts(results, out_dir / CONCEPTS_PNG))
    (out_dir / REPORT_MD).write_text(text)
    with (out_dir / SAMPLES_JSONL).open("w") as f:
        for s in samples:
            f.write(json.dumps(s) + "\n")
    return text
