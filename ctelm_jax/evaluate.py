"""Evaluates a trained run on its held-out split and writes `<workdir>/eval/` (report.md, metrics.json, plots).

`python -m ctelm_jax.evaluate --workdir=runs/default [--out=<folder> --n_test=32 --max_new_tokens=160 ...]`
"""

from __future__ import annotations

from absl import app, flags

from ctelm_jax import console
from ctelm_jax.errors import parse_floats
from ctelm_jax.eval.suite import EvalSizes, evaluate_run


def define_flags() -> None:
    """Defines the CLI's flags (only when run as a program: importing this module defines none)."""
    d = EvalSizes()
    flags.DEFINE_string("workdir", None, "Run directory (config.json + checkpoints/; local or gs://).",
                        required=True)
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    flags.DEFINE_string("out", None, "Folder of the report, metrics and samples (default: <workdir>/eval; local or "
                        "gs://).")
    flags.DEFINE_integer("n_test", d.n_test, "Held-out trials to describe.")
    flags.DEFINE_integer("max_new_tokens", d.max_new_tokens, "Token budget of a description.")
    flags.DEFINE_integer("batch_size", d.batch_size, "Decoding batch size.")
    flags.DEFINE_integer("n_attribute", d.n_attribute, "Held-out trials asked about attributes.")
    flags.DEFINE_integer("attribute_max_new_tokens", d.attribute_max_new_tokens, "Token budget of an attribute answer.")
    flags.DEFINE_integer("n_concept", d.n_concept, "Held-out trials moved along each concept.")
    flags.DEFINE_integer("concept_max_new_tokens", d.concept_max_new_tokens,
                         "Token budget of a concept-moved description (its Ages and Sex lines come early).")
    flags.DEFINE_list("strengths", [str(s) for s in d.strengths], "Concept strengths (0 is added).")
    flags.DEFINE_integer("n_novel", d.n_novel, "Vectors of each novel kind (Gaussian, midpoint).")
    flags.DEFINE_float("repetition_penalty", d.repetition_penalty,
                       "Repetition penalty of describe decoding (1 = off; OpenELM uses 1.2).")
    flags.DEFINE_integer("no_repeat_ngram_size", d.no_repeat_ngram_size,
                         "Never repeat an n-gram of generated tokens in describe / concept decoding (0 = off).")
    flags.DEFINE_integer("rerank_candidates", d.rerank_candidates,
                         "Candidates of the re-ranked describe row: the greedy text and n - 1 sampled ones, the one "
                         "closest to its embedding when re-embedded kept (0 or 1: no such row).")
    flags.DEFINE_integer("revise_rounds", d.revise_rounds,
                         "Revision rounds of the neighbour-draft and greedy-draft describe rows, for runs that train "
                         "the revise task (0: no such rows).")
    flags.DEFINE_enum("split", d.split, ["test", "validation"], "Held-out split.")
    flags.DEFINE_integer("seed", d.seed, "Seed of the trial and vector samples.")


def main(argv: list[str]) -> None:
    """Runs the evaluation with the flags' sizes and prints the report."""
    del argv
    f = flags.FLAGS
    sizes = EvalSizes(
        n_test=f.n_test, max_new_tokens=f.max_new_tokens, batch_size=f.batch_size, n_attribute=f.n_attribute,
        attribute_max_new_tokens=f.attribute_max_new_tokens, n_concept=f.n_concept,
        concept_max_new_tokens=f.concept_max_new_tokens, strengths=tuple(parse_floats("--strengths", f.strengths)),
        n_novel=f.n_novel, repetition_penalty=f.repetition_penalty, no_repeat_ngram_size=f.no_repeat_ngram_size,
        rerank_candidates=f.rerank_candidates, revise_rounds=f.revise_rounds, split=f.split, seed=f.seed)
    with console.log_file(f.workdir):
        print(evaluate_run(f.workdir, sizes, step=f.step, out=f.out))


if __name__ == "__main__":
    define_flags()
    app.run(console.entry_point(main, "ctelm_jax.evaluate"))
