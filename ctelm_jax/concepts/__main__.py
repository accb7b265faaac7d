"""Computes a run's built-in concept vectors from its training split and saves them with the run.

    python -m ctelm_jax.concepts --workdir=runs/default
"""

from __future__ import annotations

import numpy as np
from absl import app, flags

from ctelm_jax.run.concepts import compute

flags.DEFINE_string("workdir", None, "Run directory.", required=True)


def main(argv: list[str]) -> None:
    """Writes --workdir's concepts and prints each one's groups and norm."""
    del argv
    for c in compute(flags.FLAGS.workdir).values():
        print(f"{c.name}: {c.description}: {c.positive} vs {c.negative} trials, |v| = {np.linalg.norm(c.vector):.3f}")


if __name__ == "__main__":
    app.run(main)
