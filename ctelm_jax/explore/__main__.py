"""Writes the explorer of a trained run to `<workdir>/explore/` (index.html: open it in a browser, no network needed;
map.png; summary.json), or searches the run's corpus.

    python -m ctelm_jax.explore --workdir=runs/default [--clusters=12 --pairs=NCT00000102:NCT00000104
        --concept_nctids=NCT00000102 --concepts=age,sex --strengths=-1,-0.5,0,0.5,1]
    python -m ctelm_jax.explore --workdir=runs/default --search="phase 3 asthma trial in children"
    python -m ctelm_jax.explore --workdir=runs/default --search=NCT00000102

`--search` prints the trials nearest (cosine) to an NCT id of the corpus or to a text embedded with the run's
encoder, and builds no page.
"""

from __future__ import annotations

from absl import app, flags

from ctelm_jax import console
from ctelm_jax.errors import parse_floats
from ctelm_jax.explore.atlas import ExploreSizes
from ctelm_jax.explore.run import explore_run, search_run


def define_flags() -> None:
    """Defines the CLI's flags (only when run as a program)."""
    d = ExploreSizes()
    flags.DEFINE_string("workdir", None, "Run directory (config.json + checkpoints/).", required=True)
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    flags.DEFINE_string("search", "", "Print the trials nearest to this NCT id or text and exit.")
    flags.DEFINE_integer("clusters", d.clusters, "k-means regions, each labelled by the ELM.")
    flags.DEFINE_list("pairs", [], "Paths as FROM:TO NCT id pairs (default: --n_pairs pairs of region medoids).")
    flags.DEFINE_integer("n_pairs", d.pairs, "Automatic paths when --pairs is not given.")
    flags.DEFINE_integer("path_steps", d.path_steps, "Decoded points along each path, ends included.")
    flags.DEFINE_list("concept_nctids", [], "Trials to move along the concepts (default: --concept_trials seeded).")
    flags.DEFINE_integer("concept_trials", d.concept_trials, "Seeded trials moved when --concept_nctids is not given.")
    flags.DEFINE_list("concepts", [], "Concepts saved with the run to draw (default: all of them).")
    flags.DEFINE_list("strengths", [str(s) for s in d.strengths], "Concept strengths.")
    flags.DEFINE_integer("neighbours", d.neighbours, "Cosine neighbours listed per trial (page and --search).")
    flags.DEFINE_integer("max_new_tokens", d.max_new_tokens, "Token budget of each decoded text.")
    flags.DEFINE_integer("batch_size", d.batch_size, "Decoding batch size.")
    flags.DEFINE_integer("seed", d.seed, "Seed of k-means, PCA and the automatic choices.")


def parse_pairs(values: list[str]) -> list[tuple[str, str]]:
    """FROM:TO strings as NCT id pairs."""
    pairs = [tuple(v.split(":")) for v in values]
    bad = [v for v, p in zip(values, pairs) if len(p) != 2 or not all(p)]
    if bad:
        raise ValueError(f"--pairs {bad}: write each path as FROM:TO, e.g. --pairs=NCT00000102:NCT00000104.")
    return pairs


def main(argv: list[str]) -> None:
    """Runs the search or builds the explorer."""
    del argv
    f = flags.FLAGS
    if f.search:
        print(search_run(f.workdir, f.search, f.neighbours))
        return
    sizes = ExploreSizes(clusters=f.clusters, pairs=f.n_pairs, path_steps=f.path_steps,
                         concept_trials=f.concept_trials, strengths=tuple(parse_floats("--strengths", f.strengths)),
                         neighbours=f.neighbours, max_new_tokens=f.max_new_tokens, batch_size=f.batch_size,
                         seed=f.seed)
    with console.log_file(f.workdir):
        print(explore_run(f.workdir, sizes, parse_pairs(f.pairs), f.concept_nctids, f.concepts, f.step))


if __name__ == "__main__":
    define_flags()
    app.run(console.entry_point(main, "ctelm_jax.explore", also=(ValueError, FileNotFoundError)))
