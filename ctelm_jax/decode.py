"""Decode text from trial embeddings with a trained run: describe, compare, ask, interpolate, move along a concept.

    python -m ctelm_jax.decode --workdir=runs/default --mode=describe --nctids=NCT00000102,NCT00000104
    python -m ctelm_jax.decode --workdir=runs/default --mode=describe --nctids=NCT00000102 --quantize=int8
    python -m ctelm_jax.decode --workdir=runs/default --mode=describe --nctids=NCT00000102 --rerank=8
    python -m ctelm_jax.decode --workdir=runs/default --mode=describe --texts="Phase: phase 2 ..." --texts="..."
    python -m ctelm_jax.decode --workdir=runs/default --mode=compare --npy=two_vectors.npy
    python -m ctelm_jax.decode --workdir=runs/default --mode=ask --nctids=NCT00000102 \
        --question="What ages can enroll in the trial {E}?"
    python -m ctelm_jax.decode --workdir=runs/default --mode=interpolate --nctids=NCT00000102,NCT00000104 --steps=5
    python -m ctelm_jax.decode --workdir=runs/default --mode=concept --concept=age --strengths=-1,-0.5,0,0.5,1 \
        --nctids=NCT00000102
    python -m ctelm_jax.decode --workdir=runs/default --mode=embed --texts="Phase: phase 2 ..." --out=vectors.npy

`--rerank=N` (describe, interpolate, concept) decodes N candidates per text: one with the decoding flags (greedy by
default) and N - 1 sampled at `--rerank_temperature` / `--rerank_top_p` from `--seed`, re-embeds them with the run's
encoder and keeps the one closest to the input vector (`rerank`); each result carries its cosine and candidate index.

`--draft=neighbour|greedy --rounds=R` (describe, interpolate, concept) revises a draft R times toward each input vector
(`revise`; the run must have trained the `revise` task): the nearest training trial (never the input trial itself),
or the greedy describe text; each round re-embeds the last text with the run's encoder. The kept text is the round
closest to the vector; each result carries every round's cosine and the draft's, and the draft is a candidate only
with `--keep_draft`.

`--mode=embed` goes the other way: the run's ELM predicts each of `--texts`' encoder embedding (text -> vector, its
embedding-prediction head), printed with its cosine to the encoder's embedding where the encoder is available, and
with `--out`, saved as an (n, d) .npy.

Inputs come from exactly one of `--texts` (embedded with the run's encoder), `--npy` ((n, d) or (d,) float array)
or `--nctids` (rows of the run's corpus embeddings). Results are printed and, with `--out`, written as JSONL (one
object per decoded text: mode, inputs, setting, prompt, text, parsed fields).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import numpy as np
from absl import app, flags, logging
from etils import epath

from ctelm_jax import concepts as concepts_lib
from ctelm_jax import console, fs, prompts
from ctelm_jax.data import render
from ctelm_jax.data.embeddings import embedding_paths
from ctelm_jax.errors import MissingInput, UserError, parse_floats
from ctelm_jax.generate import SamplingConfig
from ctelm_jax.models.elm import ELM
from ctelm_jax.models.quantize import QUANTIZE_MODES, quantize_elm
from ctelm_jax.rerank import Encode, RerankConfig, input_vectors, rerank
from ctelm_jax.revise import DRAFTS, MAX_ROUNDS, check_rounds, revise
from ctelm_jax.run.config import load_run_config
from ctelm_jax.run.corpus import load_splits, run_encoder
from ctelm_jax.run.trained import load_trained
from ctelm_jax.text_embedding import embed_texts
from ctelm_jax.vectors import nearest_neighbours
from ctelm_jax.weights.tokenizer import Tokenizer

MODES = ("describe", "compare", "ask", "interpolate", "concept", "embed")
RERANK_MODES = ("describe", "interpolate", "concept")  # a text compared with the one embedding it describes


@dataclasses.dataclass(frozen=True)
class Job:
    """One prompt to decode: its embeddings, where they came from and the setting that made them."""

    inputs: tuple[str, ...]
    prompt: list[int]
    vectors: np.ndarray  # (n, d), one row per embedding slot of the prompt
    setting: dict[str, Any]


def check_vectors(array: np.ndarray, dim: int, source: str) -> np.ndarray:
    """`array` as float32 (n, dim) after checking shape and values; warns on vectors that are not unit length."""
    array = np.asarray(array)
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or array.shape[1] != dim or array.shape[0] == 0:
        raise ValueError(f"{source}: embeddings of shape {array.shape}; this model takes (n, {dim}) with n >= 1.")
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{source}: embeddings are {array.dtype}; expected floating point.")
    bad = np.flatnonzero(~np.isfinite(array).all(axis=1))
    if bad.size:
        raise ValueError(f"{source}: embedding rows {bad[:5].tolist()} contain NaN or inf.")
    norms = np.linalg.norm(array, axis=1)
    if (norms == 0).any():
        raise ValueError(f"{source}: embedding rows {np.flatnonzero(norms == 0)[:5].tolist()} are zero vectors.")
    if np.abs(norms - 1).max() > 1e-2:
        logging.warning("%s: embeddings have norms %.3f..%.3f; the model was trained on unit vectors.", source,
                        norms.min(), norms.max())
    return array.astype(np.float32)


def vectors_from_npy(path: str | os.PathLike, dim: int) -> tuple[list[str], np.ndarray]:
    """(labels, vectors) of a .npy file (local or remote)."""
    path = fs.as_path(path)
    if not path.is_file():
        raise MissingInput(f"--npy={path}: no such file.")
    with path.open("rb") as f:
        vectors = check_vectors(np.load(f, allow_pickle=False), dim, str(path))
    return [f"{path.name}[{i}]" for i in range(len(vectors))], vectors


def vectors_from_nctids(nctids: Sequence[str], ids: Sequence[str], embeddings: np.ndarray,
                        source: str) -> tuple[list[str], np.ndarray]:
    """(labels, vectors) of NCT ids looked up in a corpus' (ids, embeddings)."""
    wanted = [n.strip().upper() for n in nctids if n.strip()]
    if not wanted:
        raise ValueError("--nctids is empty; give one or more NCT ids, e.g. --nctids=NCT00000102,NCT00000104.")
    row = {n.upper(): i for i, n in enumerate(ids)}
    missing = [n for n in wanted if n not in row]
    if missing:
        raise ValueError(f"NCT ids {missing[:5]} are not in {source} ({len(ids)} trials); check the ids or embed "
                         "the trials' text with --texts.")
    return wanted, embeddings[[row[n] for n in wanted]]


def make_jobs(mode: str, tokenizer: Tokenizer, labels: Sequence[str], vectors: np.ndarray, *, question: str = "",
              steps: int = 5, strengths: Sequence[float] = (), concept: concepts_lib.Concept | None = None
              ) -> list[Job]:
    """The prompts `mode` decodes for the given input vectors (see the module docstring)."""
    labels, n = list(labels), len(vectors)

    def need(count: int) -> None:
        if n != count:
            raise ValueError(f"--mode={mode} takes exactly {count} embeddings; got {n} ({labels}).")

    if mode == "describe":
        return [Job((lab,), prompts.describe_prompt(tokenizer), v[None], {}) for lab, v in zip(labels, vectors)]
    if mode == "compare":
        need(2)
        return [Job(tuple(labels), prompts.compare_prompt(tokenizer), vectors, {})]
    if mode == "ask":
        if not question.strip():
            raise ValueError("--mode=ask needs --question, e.g. --question='What phase is the trial {E}?'")
        prompt = prompts.instruction_prompt(tokenizer, question)
        k = prompts.slots(tokenizer, prompt)
        if k == 1:
            return [Job((lab,), prompt, v[None], {"question": question}) for lab, v in zip(labels, vectors)]
        need(k)
        return [Job(tuple(labels), prompt, vectors, {"question": question})]
    if mode == "interpolate":
        need(2)
        if steps < 2:
            raise ValueError(f"--steps={steps}; interpolation needs at least 2 points (the two ends).")
        jobs = []
        for t in np.linspace(0.0, 1.0, steps):
            v = (1.0 - t) * vectors[0] + t * vectors[1]
            norm = np.linalg.norm(v)
            if norm == 0:
                raise ValueError("the two embeddings are opposite; their interpolation passes through zero.")
            jobs.append(Job(tuple(labels), prompts.describe_prompt(tokenizer), (v / norm)[None].astype(np.float32),
                            {"t": round(float(t), 4)}))
        return jobs
    if mode == "concept":
        if concept is None:
            raise ValueError("--mode=concept needs --concept (a name saved with the run, e.g. age, pediatric, sex).")
        if not strengths:
            raise ValueError("--mode=concept needs --strengths, e.g. --strengths=-1,-0.5,0,0.5,1.")
        return [Job((lab,), prompts.describe_prompt(tokenizer), concepts_lib.apply(v, concept.vector, s)[None],
                    {"concept": concept.name, "strength": float(s)}) for lab, v in zip(labels, vectors)
                for s in strengths]
    raise ValueError(f"unknown --mode={mode!r}; choose one of {MODES}.")


def rerank_config(mode: str, candidates: int, temperature: float, top_p: float, seed: int) -> RerankConfig | None:
    """The settings of `--rerank` and its flags, None when off; a UserError naming the flag for a bad value."""
    if candidates < 0:
        raise UserError(f"--rerank={candidates}: pass 0 or 1 (off) or the number of candidates per text, "
                        "e.g. --rerank=4.")
    if candidates <= 1:
        return None
    if mode not in RERANK_MODES:
        raise UserError(f"--rerank={candidates} re-ranks texts by their cosine to the one embedding they describe: "
                        f"--mode={'/'.join(RERANK_MODES)}, not --mode={mode}; pass --rerank=0.")
    try:
        return RerankConfig(candidates, temperature, top_p, seed)
    except ValueError as e:  # its message starts with the field (temperature=..., top_p=...): name the flag
        raise UserError(f"--rerank_{e}") from e


def _result(tokenizer: Tokenizer, job: Job, text: str, extra: dict[str, Any]) -> dict[str, Any]:
    """One decoded job's result dict: inputs, setting, prompt, text, parsed fields (or None), then `extra`."""
    parsed = render.parse_text(text)
    return {"inputs": list(job.inputs), **job.setting, "prompt": tokenizer.decode(job.prompt, False), "text": text,
            "fields": None if parsed is None else dataclasses.asdict(parsed), **extra}


def decode_jobs(model: ELM, tokenizer: Tokenizer, jobs: Sequence[Job], config: SamplingConfig, seed: int = 0,
                options: RerankConfig | None = None, encode: Encode | None = None) -> list[dict[str, Any]]:
    """Decodes every job; one result dict per job (inputs, setting, text, parsed fields or None); with `options`,
    re-ranked by `encode` (`rerank`), each result also holding its cosine, candidate index and candidates' cosines."""
    prompt_ids, vectors = [j.prompt for j in jobs], [j.vectors for j in jobs]
    if options is not None and encode is None:
        raise ValueError("re-ranking re-embeds the candidates: pass `encode` (the run's encoder) with `options`.")
    if options is None:
        texts, scores = prompts.decode_texts(model, tokenizer, prompt_ids, vectors, config, seed), [{}] * len(jobs)
    else:
        ranked = rerank(model, tokenizer, prompt_ids, vectors, config, encode, options, seed)
        texts = ranked.texts
        scores = [{"cosine": round(float(ranked.cosines[i, c]), 4), "candidate": int(c),
                   "candidate_cosines": [round(float(x), 4) for x in ranked.cosines[i]]}
                  for i, c in enumerate(ranked.chosen)]
    return [_result(tokenizer, job, text, score) for job, text, score in zip(jobs, texts, scores)]


def revise_jobs(model: ELM, tokenizer: Tokenizer, jobs: Sequence[Job], config: SamplingConfig, encode: Encode,
                draft: str, rounds: int, keep_draft: bool = False,
                pool: tuple[Sequence[str], Sequence[str], np.ndarray] | None = None) -> list[dict[str, Any]]:
    """Revises a draft of every job's text `rounds` times (`revise`): `neighbour` drafts are the nearest text of
    `pool` (ids, texts, embeddings; never the job's own id), `greedy` drafts the jobs' greedy decodes. One result
    dict per job as `decode_jobs`', with the draft, its cosine, every round's cosine and the kept round."""
    targets = input_vectors([j.vectors for j in jobs])
    if draft == "neighbour":
        if pool is None:
            raise ValueError("neighbour drafts need the pool of corpus texts and embeddings.")
        ids, texts, embeddings = pool
        nearest = nearest_neighbours(targets, embeddings, [j.inputs[0] for j in jobs], ids)
        drafts, draft_vectors = [texts[i] for i in nearest], np.asarray(embeddings)[nearest]
        sources = [ids[i] for i in nearest]
    else:
        drafts = prompts.decode_texts(model, tokenizer, [j.prompt for j in jobs], [j.vectors for j in jobs], config)
        draft_vectors, sources = np.asarray(encode(drafts)), ["greedy"] * len(jobs)
    revised = revise(model, tokenizer, targets, drafts, draft_vectors, config, encode, rounds, keep_draft)
    return [_result(tokenizer, job, text, {
        "draft": drafts[i], "draft_source": sources[i], "draft_cosine": round(float(revised.draft_cosines[i]), 4),
        "round_cosines": [round(float(c), 4) for c in revised.cosines[:, i]], "round": int(revised.chosen[i]),
        "cosine": round(float(revised.chosen_cosines[i]), 4)})
        for i, (job, text) in enumerate(zip(jobs, revised.texts))]


def readable(mode: str, result: dict[str, Any]) -> str:
    """A result as a short header line and its text."""
    setting = ", ".join(f"{k}={result[k]}" for k in ("question", "t", "concept", "strength", "candidate", "round",
                                                     "draft_source", "draft_cosine", "cosine") if k in result)
    return f"=== {mode}: {' + '.join(result['inputs'])}{f' ({setting})' if setting else ''}\n{result['text']}\n"


def define_flags() -> None:
    """Defines the CLI's flags (only when run as a program)."""
    flags.DEFINE_string("workdir", None, "Run directory (config.json + checkpoints/; local or gs://).", required=True)
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    flags.DEFINE_enum("mode", "describe", MODES, "What to decode.")
    flags.DEFINE_multi_string("texts", [], "Trial texts to embed with the run's encoder (repeat the flag).")
    flags.DEFINE_string("npy", "", ".npy file of embeddings, (n, d) or (d,).")
    flags.DEFINE_list("nctids", None, "NCT ids of trials in the run's corpus.")
    flags.DEFINE_string("question", "", "ask: the question, with {E} (or <|embedding|>) where each trial goes.")
    flags.DEFINE_integer("steps", 5, "interpolate: number of points from the first to the second embedding.")
    flags.DEFINE_string("concept", "", "concept: the concept's name (saved with the run: age, pediatric, sex).")
    flags.DEFINE_list("strengths", ["-1", "-0.5", "0", "0.5", "1"], "concept: strengths to move by.")
    flags.DEFINE_string("out", "", "Write the results as JSONL here.")
    flags.DEFINE_integer("max_new_tokens", 192, "Token budget per text.")
    flags.DEFINE_float("temperature", 0.0, "Sampling temperature (0: greedy).")
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1: off).")
    flags.DEFINE_float("repetition_penalty", 1.0, "HF-style repetition penalty (1: off; OpenELM uses 1.2).")
    flags.DEFINE_integer("no_repeat_ngram_size", 0, "Never repeat an n-gram of the generated tokens (0: off).")
    flags.DEFINE_integer("batch_size", 16, "Decoding batch size.")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_integer("rerank", 0, "describe / interpolate / concept: decode this many candidates per text, "
                         "re-embed them with the run's encoder and keep the closest to the input vector (0 or 1: off).")
    flags.DEFINE_float("rerank_temperature", 0.7, "--rerank: sampling temperature of the candidates after the first.")
    flags.DEFINE_float("rerank_top_p", 1.0, "--rerank: nucleus sampling mass of the candidates after the first "
                       "(1: off; below 1 sorts the vocabulary at every step, slow on CPU).")
    flags.DEFINE_enum("draft", "none", DRAFTS, "describe / interpolate / concept: revise a draft toward each vector "
                      "(`revise` task): the nearest training trial (neighbour) or the greedy text (greedy); none: off.")
    flags.DEFINE_integer("rounds", 2, f"--draft: revision rounds, 1 to {MAX_ROUNDS}; the closest round is kept.")
    flags.DEFINE_bool("keep_draft", False, "--draft: the draft itself may be kept when it is closest (the result "
                      "says round=0).")
    flags.DEFINE_enum("quantize", "none", QUANTIZE_MODES,
                      "Weight-only quantisation for decoding: int8 holds the decoder's matrices as int8 with one scale "
                      "per output channel (a quarter of float32's bytes).")


def _input_vectors(f: flags.FlagValues, workdir: epath.Path, config: Any, tokenizer: Tokenizer,
                   encoder: tuple[Encode | None, str]) -> tuple[list[str], np.ndarray]:
    """(labels, vectors) from whichever of --texts / --npy / --nctids was given (`encoder`: `run_encoder`'s)."""
    dim = int(config.model.domain_dim)
    given = [name for name, v in (("--texts", f.texts), ("--npy", f.npy), ("--nctids", f.nctids is not None)) if v]
    if len(given) != 1:
        raise app.UsageError(f"give exactly one input source of --texts, --npy, --nctids (got {given or 'none'}).")
    if f.npy:
        return vectors_from_npy(f.npy, dim)
    if f.texts:
        encode, note = encoder
        if encode is None:
            raise ValueError(f"cannot embed --texts: {note}.")
        vectors = check_vectors(encode(f.texts), dim, "encoded --texts")
        return [t[:40] + ("..." if len(t) > 40 else "") for t in f.texts], vectors
    splits = load_splits(config, workdir)
    ids = [r["nctid"] for s in splits.values() for r in s.records]
    embeddings = np.concatenate([s.embeddings for s in splits.values()])
    return vectors_from_nctids(f.nctids, ids, embeddings, f"{workdir}'s corpus")


def _draft_pool(workdir: epath.Path) -> tuple[list[str], list[str], np.ndarray]:
    """(ids, canonical texts, embeddings) of the run's training trials, the pool of neighbour drafts; a UserError
    when the run has no corpus embeddings (they are not computed here)."""
    config = load_run_config(workdir)
    source = config.data.embeddings or workdir / "embeddings" / "corpus"
    if not all(fs.as_path(p).is_file() for p in embedding_paths(source)):
        raise UserError(f"--draft=neighbour drafts from the run's corpus embeddings, and {source} has none; pass "
                        "--draft=greedy, or embed the corpus first (python -m ctelm_jax.embed).")
    train = load_splits(config, workdir)["train"]
    return [r["nctid"] for r in train.records], [render.render_text(r) for r in train.records], train.embeddings


def main(argv: list[str]) -> None:
    """Runs `decode` with the parsed flags."""
    del argv
    with console.log_file(flags.FLAGS.workdir):
        decode(flags.FLAGS)


def decode(f: flags.FlagValues) -> None:
    """Loads the run, builds the prompts of --mode, decodes, prints and writes the results."""
    workdir = fs.as_path(f.workdir)
    strengths = parse_floats("--strengths", f.strengths)
    options = rerank_config(f.mode, f.rerank, f.rerank_temperature, f.rerank_top_p, f.seed)
    drafting = f.draft != "none"
    if drafting:
        check_rounds(f.rounds, f.draft)
        if f.mode not in RERANK_MODES:
            raise UserError(f"--draft={f.draft} revises a text toward the one vector it describes: "
                            f"--mode={'/'.join(RERANK_MODES)}, not --mode={f.mode}; pass --draft=none.")
        if options is not None:
            raise UserError(f"--draft={f.draft} and --rerank={f.rerank} both choose among texts; pass one of them "
                            "(--rerank=0 or --draft=none).")
    # The encoder (to embed --texts, to re-rank or revise), checked before the model is loaded.
    wants_encoder = f.mode != "embed" and (bool(f.texts) or options is not None or drafting)
    encoder = run_encoder(load_run_config(workdir)) if wants_encoder else (None, "")
    if options is not None and encoder[0] is None:
        raise UserError(f"--rerank={f.rerank} re-embeds the candidates with the run's encoder, but {encoder[1]}; "
                        "pass --rerank=0.")
    if drafting and encoder[0] is None:
        raise UserError(f"--draft={f.draft} re-embeds every round's text with the run's encoder, but {encoder[1]}; "
                        "pass --draft=none.")
    pool = _draft_pool(workdir) if f.draft == "neighbour" else None
    concept = None
    if f.mode == "concept":
        saved = concepts_lib.load(workdir)
        if f.concept not in saved:
            raise ValueError(f"--concept={f.concept!r} is not saved with {workdir}; saved: {sorted(saved)}.")
        concept = saved[f.concept]
    model, tokenizer, config, step = load_trained(workdir, f.step)
    if f.mode == "embed":
        embed(f, model, tokenizer, config)
        return
    model = quantize_elm(model, f.quantize)
    labels, vectors = _input_vectors(f, workdir, config, tokenizer, encoder)
    jobs = make_jobs(f.mode, tokenizer, labels, vectors, question=f.question, steps=f.steps,
                     strengths=strengths, concept=concept)
    config_s = prompts.sampling_config(tokenizer, f.max_new_tokens, f.batch_size, f.temperature, f.top_p,
                                       f.repetition_penalty, f.no_repeat_ngram_size)
    if drafting:
        results = revise_jobs(model, tokenizer, jobs, config_s, encoder[0], f.draft, f.rounds, f.keep_draft, pool)
    else:
        results = decode_jobs(model, tokenizer, jobs, config_s, f.seed, options, encoder[0])
    for r in results:
        print(readable(f.mode, r))
    if f.out:
        out_path = fs.as_path(f.out)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        with out_path.open("w") as out:
            for r in results:
                out.write(json.dumps({"mode": f.mode, "workdir": str(workdir), "step": step, **r}) + "\n")
        print(f"wrote {len(results)} results to {f.out}")


def embed(f: flags.FlagValues, model: ELM, tokenizer: Tokenizer, config: Any) -> None:
    """--mode=embed: the ELM's embeddings of --texts, printed (with cos to the encoder's) and saved to --out."""
    if not f.texts:
        raise app.UsageError("--mode=embed embeds --texts (repeat the flag); --npy and --nctids are vectors already.")
    predicted = embed_texts(model, tokenizer, f.texts, f.batch_size)
    encode, note = run_encoder(config)
    cos = None if encode is None else (predicted * check_vectors(encode(f.texts), predicted.shape[1], "encoder")).sum(1)
    for i, text in enumerate(f.texts):
        score = f"cos to the encoder {cos[i]:.3f}" if cos is not None else f"no encoder ({note})"
        print(f"=== embed: {text[:60]!r} ({score})\n{np.array2string(predicted[i][:8], precision=3)} ...")
    if f.out:
        out_path = fs.as_path(f.out)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        with out_path.open("wb") as out:
            np.save(out, predicted)
        print(f"wrote {predicted.shape} embeddings to {f.out}")


if __name__ == "__main__":
    define_flags()
    app.run(console.entry_point(main, "ctelm_jax.decode", also=(ValueError, FileNotFoundError)))
