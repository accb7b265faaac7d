"""Built-in concept vectors by both methods on the shipped corpus: centroid differences (ctELM's) against edit pairs
(`concepts.method=edit_pair`), with each edit-pair vector's split-half cosine, the cosine between the two methods'
vectors, their norms and the encoder time. The corpus and edited-text embeddings are cached in --workdir.

    .venv/bin/python bench/concept_vectors.py [--workdir=runs/concepts_bench] [--n_trials=200]
"""

import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs.default import get_config  # noqa: E402
from ctelm_jax import concepts  # noqa: E402
from ctelm_jax.run.concepts import edit_pair_builtins  # noqa: E402
from ctelm_jax.run.corpus import load_splits  # noqa: E402
from ctelm_jax.vectors import cosine_rows  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", "runs/concepts_bench", "Where the embeddings are cached.")
_N = flags.DEFINE_integer("n_trials", 200, "Edit pairs per concept.")


def main(argv: list[str]) -> None:
    """Prints the markdown table of both methods' vectors."""
    del argv
    config = get_config()
    config.concepts.method, config.concepts.n_trials = "edit_pair", _N.value
    clock = time.perf_counter()
    train = load_splits(config, _WORKDIR.value)["train"]
    corpus_s = time.perf_counter() - clock
    centroid = concepts.builtin(train.records, train.embeddings)
    clock = time.perf_counter()
    edit = edit_pair_builtins(_WORKDIR.value, config, train)
    edit_s = time.perf_counter() - clock
    print(f"training split: {len(train.records)} trials (corpus embeddings {corpus_s:.0f} s, cached after the first "
          f"run); edit pairs: {_N.value} per concept ({edit_s:.0f} s)\n")
    print("| concept | centroid: groups | centroid norm | edit-pair norm | mean edit norm | split-half cosine "
          "| cos(edit pair, centroid) |")
    print("|---|---|---|---|---|---|---|")
    for name, c in centroid.items():
        e = edit[name]
        cos = float(cosine_rows(e.vector[None], c.vector[None])[0])
        print(f"| {name} | {c.positive} vs {c.negative} | {np.linalg.norm(c.vector):.3f} | "
              f"{np.linalg.norm(e.vector):.3f} | {e.stats['mean_edit_norm']:.3f} | "
              f"{e.stats['split_half_cosine']:.3f} | {cos:.3f} |")


if __name__ == "__main__":
    app.run(main)
