"""`python -m ctelm_jax.train --config=configs/<name>.py --workdir=DIR [--config.key=value ...]`."""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from ctelm_jax import console
from ctelm_jax.train.loop import train

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Training config file (ml_collections).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, TensorBoard events, resolved config.")
flags.mark_flag_as_required("workdir")


def main(argv: list[str]) -> None:
    """Trains (or resumes) the configured curriculum in --workdir; a run stopped by a signal exits 128 + its number
    (143 for SIGTERM, 130 for Ctrl-C), as a shell reports a killed job, so that wrappers rerun it rather than take it
    for finished."""
    del argv
    summary = train(_CONFIG.value, _WORKDIR.value)
    logging.info("training %s at step %s", summary["status"], summary.get("step"))
    if summary["status"] == "preempted":
        sys.exit(128 + summary["signal"])


if __name__ == "__main__":
    app.run(console.entry_point(main, "ctelm_jax.train"))
