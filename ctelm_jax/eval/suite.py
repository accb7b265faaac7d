"""The evaluation of a trained run on a held-out split: decodes, scores against baselines, writes the report.

Systems compared on `describe` (decode the trial's text from its embedding):
  ELM                  the run's checkpoint (adapter + LoRA on the frozen decoder), greedy decoding.
  ELM, re-ranked (n=K) the same ELM's greedy text and K - 1 sampled ones, the one whose re-embedding is closest to the
                       input embedding kept (`rerank`; never below the greedy text's re-embed cosine).
  untrained adapter    `build_elm(config.model)`: the same pretrained decoder with the freshly initialised adapter the
                       run started from and LoRA at its initialisation (B = 0, a no-op): the model at step 0. It shows
                       what the decoder writes from soft tokens it was never taught to read.
  nearest neighbour    the canonical text of the most cosine-similar training embedding (retrieval, never the trial
                       itself); strong on re-embed cosine by construction, it says how much generation beats lookup.
  random training text the canonical text of a random training trial (the floor).
Re-embed cosine embeds each text as is with the run's frozen encoder (the training target is `render_text`, so a
decoded text is already in the form the corpus was embedded from) and compares it with the input embedding.
ROUGE-L and BLEU compare each text with the trial's true `render_text`, and so do the fact scores (`eval.facts`: key
fields retained, condition / intervention F1, age bounds, criteria on the right side).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import numpy as np

from ctelm_jax import concepts as concepts_lib
from ctelm_jax import console, fs, prompts
from ctelm_jax.data import render
from ctelm_jax.data.tasks import attribute_answer
from ctelm_jax.errors import UserError
from ctelm_jax.eval import facts, metrics, probes, report
from ctelm_jax.parallel.rules import as_rules, constrainer
from ctelm_jax.rerank import Encode, RerankConfig, rerank
from ctelm_jax.revise import MAX_ROUNDS, revise
from ctelm_jax.run.build import build_elm
from ctelm_jax.run.concepts import edit_pair_builtins, load_or_compute
from ctelm_jax.run.config import load_run_config
from ctelm_jax.run.corpus import load_splits, run_encoder
from ctelm_jax.run.trained import load_trained, run_mesh
from ctelm_jax.text_embedding import embed_texts
from ctelm_jax.vectors import cosine_rows, nearest_neighbours

MAJORITY_SAMPLE = 500


@dataclasses.dataclass(frozen=True)
class EvalSizes:
    """How much to decode; the defaults keep the default 135M model's evaluation to a few minutes on 2 CPU cores."""

    n_test: int = 32
    max_new_tokens: int = 176  # canonical texts: median 135 tokens, 95% <= 164 (160 would cut ~8% of them)
    batch_size: int = 32
    n_attribute: int = 32
    attribute_max_new_tokens: int = 32  # the longest answers (conditions): 95% <= 25 tokens
    n_concept: int = 24  # per concept and strength; a share's 95% interval is then at most about ±0.19 wide
    concept_max_new_tokens: int = 72  # the Ages and Sex lines end within 69 tokens for 95% of trials
    strengths: tuple[float, ...] = (-1.0, -0.5, 0.0, 0.5, 1.0)
    n_novel: int = 8
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 4  # 0 on the validation split: 47% well-formed, re-embed cosine 0.506; 4: 78%, 0.560
    # Describe candidates of the re-ranked ELM row (0 or 1: no such row). On the default run's 2 CPU cores greedy
    # describe of the 32 trials takes about a minute (~0.34 s a step of 32 rows); a sampled batch of 32 takes about
    # 1.25 of that (the draw over 49,152 tokens adds ~0.09 s a step; `RerankConfig.top_p` stays 1, a nucleus would add
    # 0.85 s) and runs until its longest text ends: 3 candidates (2 sampled batches, 96 re-embedded texts) add about
    # 2.5 minutes, 4 would add nearly 4.
    rerank_candidates: int = 3
    # Revision rounds of the "ELM, neighbour / greedy draft" rows (`revise`); only for runs that train the revise task.
    revise_rounds: int = 2
    split: str = "test"
    seed: int = 0

    def __post_init__(self):
        if self.rerank_candidates < 0:
            raise UserError(f"rerank_candidates={self.rerank_candidates}: use 0 or 1 (off) or a count >= 2, e.g. "
                            "--rerank_candidates=4.")
        if not 0 <= self.revise_rounds <= MAX_ROUNDS:
            raise UserError(f"revise_rounds={self.revise_rounds}: use 0 (no revised rows) to {MAX_ROUNDS}, e.g. "
                            "--revise_rounds=2.")
        counts = {k: getattr(self, k) for k in ("n_test", "max_new_tokens", "batch_size", "n_attribute",
                                                "attribute_max_new_tokens", "n_concept", "concept_max_new_tokens",
                                                "n_novel")}
        bad = {k: v for k, v in counts.items() if v < 1}
        if bad:
            raise ValueError(f"evaluation sizes must be positive: {bad}")


def _pick(n_total: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """n distinct indices (all if fewer), in random order."""
    return rng.permutation(n_total)[: min(n, n_total)]


def _vector_sets(run_vectors: dict[str, concepts_lib.Concept], workdir: Any, config: Any,
                 train: Any) -> tuple[dict[str, dict[str, concepts_lib.Concept]], str]:
    """{method: built-in concept vectors}, the run's own first (by its built-in concepts' method), and the other
    method's beside them (edit pairs are embedded once and cached in the workdir), with a note saying why the other
    set is missing where it is."""
    method = next((c.method for name, c in run_vectors.items() if name in concepts_lib.BUILTIN), "centroid")
    out = {method: run_vectors}
    other = next(m for m in concepts_lib.METHODS if m != method)
    try:
        if other == "centroid":
            out[other] = concepts_lib.builtin(train.records, train.embeddings)
        else:
            out[other] = edit_pair_builtins(workdir, config, train)
    except (UserError, ValueError) as e:
        return out, f"{other} vectors not compared: {e}"
    return out, f"{other} vectors compared beside them"


def _trains(config: Any, task: str) -> bool:
    """Whether a stage of the run's curriculum gives `task` a positive weight."""
    return any(float(dict(stage["tasks"]).get(task, 0)) > 0 for stage in config.stages)


def _line_accuracy(systems: dict[str, Any], truths: list[render.TrialFields],
                   majority: dict[str, str]) -> dict[str, dict[str, float]]:
    """The describe texts' Ages and Sex lines: share right for each system, and for always writing the training
    split's majority line."""
    out = {}
    for line in ("ages", "sex"):
        row = {name: float(system["facts"][line]) for name, system in systems.items()}
        row["majority line"] = float(np.mean([attribute_answer(f, line) == majority[line] for f in truths]))
        out[line] = row
    return out


def evaluate_run(workdir: str | os.PathLike, sizes: EvalSizes = EvalSizes(), encode: Encode | None = None,
                 step: int | None = None, out: str | os.PathLike | None = None) -> str:
    """Evaluates the run in `workdir`; writes `{report.md, metrics.json, samples.jsonl, *.png}` to `out` (default
    `<workdir>/eval`, where the explorer looks) and returns the report's markdown. `encode` replaces the run's encoder
    (tests)."""
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 2)
        clock = now
        console.say(f"evaluation: {name} took {timings[name]:.1f} s")

    workdir = fs.as_path(workdir)
    out_dir = workdir / "eval" if out is None else fs.as_path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    mesh = run_mesh(load_run_config(workdir))
    model, tokenizer, config, trained_step = load_trained(workdir, step, mesh)
    splits = load_splits(config, workdir)
    if sizes.split not in splits or not splits[sizes.split].records:
        raise ValueError(f"split {sizes.split!r} is empty or unknown; choose one of {sorted(splits)}.")
    held_out, train = splits[sizes.split], splits["train"]
    encoder_note = "given encoder"
    if encode is None:
        encode, encoder_note = run_encoder(config)
    rules = as_rules(config.rules)
    # The run's step 0, on the ELM's devices and laid out as it is.
    baseline_model = build_elm(config.model, tokenizer, constrainer(mesh, rules), train.embeddings, mesh, rules)
    lap("load")

    rng = np.random.default_rng(sizes.seed)
    rows = _pick(len(held_out.records), sizes.n_test, rng)
    records = [held_out.records[i] for i in rows]
    vectors = held_out.embeddings[rows]
    truths = [render.render_text(r) for r in records]
    describe = prompts.describe_prompt(tokenizer)
    cfg = prompts.sampling_config(tokenizer, sizes.max_new_tokens, sizes.batch_size,
                                  repetition_penalty=sizes.repetition_penalty,
                                  no_repeat_ngram_size=sizes.no_repeat_ngram_size)
    singles = [v[None] for v in vectors]
    # The untrained adapter first: its decode compiles the one the ELM's reuses, so the ELM's time is decoding alone.
    untrained = prompts.decode_texts(baseline_model, tokenizer, [describe] * len(rows), singles, cfg)
    lap("describe (untrained adapter)")
    texts = {"ELM": prompts.decode_texts(model, tokenizer, [describe] * len(rows), singles, cfg)}
    lap("describe (ELM)")
    decode_s = {"ELM": timings["describe (ELM)"], "untrained adapter": timings["describe (untrained adapter)"]}
    rerank_info = None
    known_cosines: dict[str, np.ndarray] = {}  # re-ranking already re-embedded its candidates: not encoded again
    if sizes.rerank_candidates > 1 and encode is not None:
        options = RerankConfig(candidates=sizes.rerank_candidates, seed=sizes.seed)
        reranked = rerank(model, tokenizer, [describe] * len(rows), singles, cfg, encode, options,
                          first=texts["ELM"])
        rerank_name = f"ELM, re-ranked (n={options.candidates})"
        texts[rerank_name] = reranked.texts
        lap("describe (ELM, re-ranked)")
        decode_s[rerank_name] = decode_s["ELM"] + timings["describe (ELM, re-ranked)"]  # greedy is its candidate 0
        known_cosines = {"ELM": reranked.cosines[:, 0], rerank_name: reranked.chosen_cosines}
        rerank_info = {"system": rerank_name, **dataclasses.asdict(options), "chosen": reranked.chosen.tolist(),
                       "greedy_kept": int((reranked.chosen == 0).sum())}
    train_ids = [r["nctid"] for r in train.records]
    nn = nearest_neighbours(vectors, train.embeddings, [r["nctid"] for r in records], train_ids)
    neighbour_texts = [render.render_text(train.records[i]) for i in nn]
    revise_info = {}
    if sizes.revise_rounds and encode is not None and _trains(config, "revise"):
        for kind in ("neighbour", "greedy"):
            name = f"ELM, {kind} draft, {sizes.revise_rounds} round{'s' if sizes.revise_rounds > 1 else ''}"
            drafts, draft_vectors = ((neighbour_texts, train.embeddings[nn]) if kind == "neighbour" else
                                     (texts["ELM"], encode(texts["ELM"])))
            revised = revise(model, tokenizer, vectors, drafts, draft_vectors, cfg, encode, sizes.revise_rounds)
            if kind == "greedy":
                known_cosines.setdefault("ELM", revised.draft_cosines)  # its draft is the greedy text, re-embedded
            texts[name], known_cosines[name] = revised.texts, revised.chosen_cosines
            lap(f"describe ({name})")
            decode_s[name] = timings[f"describe ({name})"] + (decode_s["ELM"] if kind == "greedy" else 0.0)
            revise_info[name] = {"equal_to_draft": revised.equal_to_draft,
                                 "draft_cosine": float(revised.draft_cosines.mean()),
                                 "round_cosines": [float(c) for c in revised.cosines.mean(axis=1)],
                                 "chosen": revised.chosen.tolist()}
    texts["untrained adapter"] = untrained
    texts["nearest training neighbour"] = neighbour_texts
    texts["random training text"] = [render.render_text(train.records[i])
                                     for i in rng.integers(0, len(train.records), len(rows))]
    systems = {}
    for name, system_texts in texts.items():
        row: dict[str, Any] = {"rouge_l": metrics.summary(metrics.rouge_l(system_texts, truths)),
                               "bleu": metrics.bleu(system_texts, truths),
                               "well_formed": float(np.mean([probes.well_formed(t) for t in system_texts])),
                               "facts": facts.fact_table(system_texts, truths)}
        if encode is not None:
            cos = known_cosines.get(name)
            cos = cosine_rows(encode(system_texts), vectors) if cos is None else cos
            row["cosine"], row["cosines"] = metrics.summary(cos), [round(float(c), 4) for c in cos]
        if name in decode_s:
            row["seconds_per_text"] = round(decode_s[name] / len(rows), 3)
        systems[name] = row
    lap("describe metrics")

    embed_prediction = None
    if model.embed_head is not None:
        centroid = train.embeddings.mean(axis=0)
        embed_prediction = {
            "ELM": metrics.summary(cosine_rows(embed_texts(model, tokenizer, truths, sizes.batch_size), vectors)),
            "training mean": metrics.summary(cosine_rows(np.broadcast_to(centroid, vectors.shape), vectors))}
        lap("embedding prediction")

    attr_rows = _pick(len(held_out.records), sizes.n_attribute, np.random.default_rng(sizes.seed + 1))
    attr_fields = [render.fields(held_out.records[i]) for i in attr_rows]
    attr_cfg = prompts.sampling_config(tokenizer, sizes.attribute_max_new_tokens, sizes.batch_size)
    jobs = [(a, i) for a in probes.EVAL_ATTRIBUTES for i in range(len(attr_rows))]
    answers_flat = prompts.decode_texts(
        model, tokenizer, [prompts.attribute_prompt(tokenizer, a) for a, _ in jobs],
        [held_out.embeddings[attr_rows[i]][None] for _, i in jobs], attr_cfg)
    answers = {a: [t for (b, _), t in zip(jobs, answers_flat) if b == a] for a in probes.EVAL_ATTRIBUTES}
    attr_truths = {a: [attribute_answer(f, a) for f in attr_fields] for a in probes.EVAL_ATTRIBUTES}
    sample = _pick(len(train.records), MAJORITY_SAMPLE, np.random.default_rng(sizes.seed + 2))
    majority = probes.majority_answers([render.fields(train.records[i]) for i in sample])
    attributes = probes.attribute_accuracy(answers, attr_truths, majority)
    lap("attributes")

    concepts, concepts_note = load_or_compute(workdir, train, config)
    vector_sets, other_note = _vector_sets(concepts, workdir, config, train)
    lap("concept vectors")
    strengths = sorted({*map(float, sizes.strengths), 0.0})
    concept_rows = _pick(len(held_out.records), sizes.n_concept, np.random.default_rng(sizes.seed + 3))
    base = held_out.embeddings[concept_rows]
    concept_cfg = prompts.sampling_config(tokenizer, sizes.concept_max_new_tokens, sizes.batch_size,
                                          repetition_penalty=sizes.repetition_penalty,
                                          no_repeat_ngram_size=sizes.no_repeat_ngram_size)
    jobs_c = [(method, c.name, s) for method, found in vector_sets.items() for c in found.values()
              if c.name in probes.CURVE_SCORES for s in strengths if s != 0.0] + [("", "", 0.0)]
    moved = [concepts_lib.apply(base, vector_sets[m][c].vector, s) if c else base for m, c, s in jobs_c]
    decoded = prompts.decode_texts(model, tokenizer, [describe] * (len(jobs_c) * len(base)),
                                   [v[None] for m in moved for v in m], concept_cfg)
    by_job = {job: decoded[k * len(base):(k + 1) * len(base)] for k, job in enumerate(jobs_c)}
    curves_by = {m: {c.name: probes.concept_curve(c.name, strengths, {s: by_job[(m, c.name, s) if s else ("", "", 0.0)]
                                                                      for s in strengths})
                     for c in found.values() if c.name in probes.CURVE_SCORES} for m, found in vector_sets.items()}
    run_method = next(iter(vector_sets))
    lap("concept curves")

    novel_rng = np.random.default_rng(sizes.seed + 4)
    gauss = probes.gaussian_vectors(train.embeddings, sizes.n_novel, novel_rng)
    mids, pairs = probes.midpoint_vectors(train.embeddings, sizes.n_novel, novel_rng)
    novel_vectors = np.concatenate([gauss, mids])
    novel_texts = prompts.decode_texts(model, tokenizer, [describe] * len(novel_vectors),
                                       [v[None] for v in novel_vectors], cfg)
    novel_cos = cosine_rows(encode(novel_texts), novel_vectors) if encode is not None else None
    novel = {}
    for name, part in (("gaussian", slice(0, len(gauss))), ("midpoint", slice(len(gauss), None))):
        novel[name] = {"n": len(novel_texts[part]),
                       "well_formed": float(np.mean([probes.well_formed(t) for t in novel_texts[part]]))}
        if novel_cos is not None:
            novel[name]["cosine"] = metrics.summary(novel_cos[part])
    lap("novel vectors")

    results = {
        "workdir": str(workdir), "step": trained_step, "split": sizes.split, "sizes": dataclasses.asdict(sizes),
        "encoder": encoder_note, "describe": systems, "rerank": rerank_info, "revise": revise_info,
        "attributes": attributes, "concepts": {
            "source": concepts_note, "method": run_method, "other": other_note,
            "definitions": {c.name: {"description": c.description, "positive": c.positive, "negative": c.negative}
                            for c in concepts.values()},
            "curves": curves_by[run_method], "by_method": {
                m: {"curves": curves, "definitions": {c.name: {"description": c.description, "positive": c.positive,
                                                               "negative": c.negative, "stats": c.stats}
                                                      for c in vector_sets[m].values()}}
                for m, curves in curves_by.items()}},
        "describe_lines": _line_accuracy(systems, [render.fields(r) for r in records], majority),
        "novel": novel, "embed_prediction": embed_prediction, "timings_s": timings,
    }
    samples = [{"task": "describe", "system": name, "nctid": r["nctid"], "text": t, "truth": truth}
               for name, ts in texts.items() for r, t, truth in zip(records, ts, truths)]
    samples += [{"task": "attributes", "attribute": a, "nctid": held_out.records[attr_rows[i]]["nctid"],
                 "text": t, "truth": attr_truths[a][i]} for (a, i), t in zip(jobs, answers_flat)]
    samples += [{"task": "concept", "vectors": m or None, "concept": c, "strength": s,
                 "nctid": held_out.records[concept_rows[i]]["nctid"], "text": t}
                for (m, c, s), ts in by_job.items() for i, t in enumerate(ts)]
    samples += [{"task": "novel", "kind": "gaussian" if k < len(gauss) else "midpoint",
                 "pair": None if k < len(gauss) else [train_ids[j] for j in pairs[k - len(gauss)]], "text": t}
                for k, t in enumerate(novel_texts)]
    markdown = report.write(out_dir, results, samples)
    lap("report")
    results["timings_s"] = timings
    (out_dir / "metrics.json").write_text(json.dumps(results, indent=1) + "\n")
    return markdown
