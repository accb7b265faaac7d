"""Hard kills: the fault-injection harness (tests/kill_harness.py) with a small count; the script runs larger ones."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from ctelm_jax.train.metrics import EventWriter, event_scalars
from kill_harness import PHASES

REPO = Path(__file__).resolve().parents[1]


def test_sigkill_at_seeded_moments_ends_as_the_uninterrupted_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device: the fastest lives
    out = tmp_path / "kills"
    proc = subprocess.run([sys.executable, "tests/kill_harness.py", "--kills", "10", "--seed", "0", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert (out / "summary.json").exists(), proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["problems"] == [], summary["problems"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert summary["kills"] == 10
    # Every kill was followed by a restart that resumed from the newest complete checkpoint (or was killed itself
    # before resuming, and the one after it was checked instead).
    assert summary["resumed_as_expected"] + summary["next_life_killed_before_resuming"] == 10
    assert summary["resumed_as_expected"] >= 1
    assert summary["params_identical"] and summary["duplicated_rows"] == 0
    landed = summary["kills_by_phase"]
    assert {p if p != "save" else "save in flight" for p in PHASES} <= set(landed), landed


def test_a_restart_drops_the_rows_logged_after_its_checkpoint(tmp_path):
    writer = EventWriter(tmp_path)
    for step in (1, 2, 3, 4):
        writer.write(step, {"loss": 1.0 / step})
    writer.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # a kill mid-write
    again = EventWriter(tmp_path, resume_step=2)  # resumed from the checkpoint of step 2: steps 3 and 4 come again
    for step in (3, 4):
        again.write(step, {"loss": 0.5 / step})
    again.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}, {"step": 3, "loss": 0.5 / 3},
                    {"step": 4, "loss": 0.125}]
    scalars = sorted(s for p in tmp_path.glob("events.out.tfevents.*") for s in event_scalars(p.read_bytes()))
    assert [(step, tag) for step, tag, _ in scalars] == [(1, "loss"), (2, "loss"), (3, "loss"), (4, "loss")]
    assert scalars[2][2] == np.float32(0.5 / 3)  # the resumed run's value, not the killed one's
