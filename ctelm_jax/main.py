"""The README's main job: train the embedded default end to end, evaluate it on the test split, write the explorer.

`python -m ctelm_jax.main --workdir=runs/default [--config=configs/default.py] [--config.key=value ...]`
"""

import json
import time

from absl import app, flags
from etils import epath
from ml_collections import config_flags

from ctelm_jax import console, fs
from ctelm_jax.train.loop import train

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Training config file (ml_collections).")
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Run directory.")


def headline(workdir: epath.Path) -> str:
    """The evaluation's describe row of the ELM against the nearest training neighbour, from its metrics.json."""
    rows = json.loads((workdir / "eval" / "metrics.json").read_text())["describe"]
    key, name = ("cosine", "re-embed cosine") if "cosine" in rows["ELM"] else ("rouge_l", "ROUGE-L")
    return ", ".join(f"{system} {rows[system][key]['mean']:.3f}" for system in ("ELM", "nearest training neighbour")
                     if system in rows) + f" ({name}, {rows['ELM'][key]['n']} test trials)"


def main(argv: list[str]) -> None:
    """Trains (resuming if the workdir has a checkpoint), evaluates, writes the explorer page and says where they are."""
    del argv
    started = time.perf_counter()
    workdir = fs.as_path(_WORKDIR.value)
    summary = train(_CONFIG.value, workdir)
    if summary["status"] != "finished":
        return
    from ctelm_jax.eval.suite import evaluate_run
    from ctelm_jax.explore.run import explore_run

    with console.log_file(workdir):
        console.say(f"evaluation of step {summary['step']} (each part's time below; the default run's takes ~13 min "
                    "on 2 CPU cores)")
        evaluate_run(workdir)
        console.say("explorer: the embedding map, its regions, paths and concept moves decoded")
        explore_run(workdir)
    console.say(f"done in {console.duration(time.perf_counter() - started)}: {headline(workdir)}.\n"
                f"  report {workdir / 'eval' / 'report.md'}\n  explorer {workdir / 'explore' / 'index.html'}\n"
                f"  log {workdir / console.LOG_FILE}; checkpoints {workdir / 'checkpoints'}")


if __name__ == "__main__":
    app.run(console.entry_point(main, "ctelm_jax.main"))
