"""The README's main job: train the embedded default end to end, evaluate it on the test split, write the explorer.

`python -m ctelm_jax.main --workdir=runs/default [--config=configs/default.py] [--config.key=value ...]`
"""

from absl import app, flags, logging
from ml_collections import config_flags

from ctelm_jax.errors import entry_point
from ctelm_jax.train.loop import train

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Training config file (ml_collections).")
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Run directory.")


def main(argv: list[str]) -> None:
    """Trains (resuming if the workdir has a checkpoint), prints the evaluation table and writes the explorer page."""
    del argv
    summary = train(_CONFIG.value, _WORKDIR.value)
    logging.info("training %s at step %s", summary["status"], summary.get("step"))
    if summary["status"] != "finished":
        return
    from ctelm_jax.eval.suite import evaluate_run
    print(evaluate_run(_WORKDIR.value))
    from ctelm_jax.explore.run import explore_run
    print(explore_run(_WORKDIR.value))


if __name__ == "__main__":
    app.run(entry_point(main, "ctelm_jax.main"))
