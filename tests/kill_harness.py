"""Fault injection: a tiny training run killed with SIGKILL at seeded moments, restarted until it finishes, and
compared with an uninterrupted run.

    python tests/kill_harness.py --kills 40 --seed 1 --out /tmp/kills     # the suite runs --kills 10

The harness imports everything once and forks one process per life of a run (an uninterrupted reference, then
chains of killed-and-restarted runs, each in its own workdir); every life calls `train(config, workdir)` with the
same config, as rerunning the same command does. A life is killed with SIGKILL (never caught, nothing flushed) by a
trigger armed in it, each phase equally often in a seeded order: during start-up (a random moment), during a step (a random moment after its batch is
placed), during an asynchronous checkpoint save (right after it started), during validation (after an eval batch)
or during a periodic export (after its tensors were written, before its folder is put in place). A trigger writes
what was in progress (and whether a save's temporary folder was there) before the kill.

Checked: each restart resumes from the newest complete checkpoint left by the killed life; every chain ends with
final parameters and optimizer state bitwise equal to the reference, metrics.jsonl and the TensorBoard events with
one row per step equal to the reference's, the periodic exports equal to the reference's, and no staging folders.
The summary (JSON) is written to `<out>/summary.json` and its first line printed."""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHASES = ("startup", "step", "save", "validation", "export")
TIMING_KEYS = {"step_time_s", "tokens_per_s", "mfu"}  # wall-clock figures: differ between any two runs


def harness_config():
    """configs/tiny.py with asynchronous saves every 2 steps, validation every 4 and a periodic export every 4."""
    from configs import tiny

    c = tiny.get_config()
    c.checkpoint.async_save = True
    c.checkpoint.every_steps = 2
    c.checkpoint.keep = 2
    c.export.every_steps = 4
    return c


def total_steps(config) -> int:
    """The run's last step."""
    return sum(int(s["steps"]) for s in config.stages)


def steps_on_disk(workdir: Path) -> list[int]:
    """The complete checkpoint steps in a workdir (orbax renames a finished step's temporary folder to its number)."""
    folder = workdir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def saves_in_flight(workdir: Path) -> bool:
    """Whether a checkpoint step's temporary folder is there (a save under way)."""
    folder = workdir / "checkpoints"
    return folder.is_dir() and any("tmp" in p.name for p in folder.iterdir())


def arm(phase: str, rng: random.Random, workdir: Path, report: Path) -> None:
    """Arms this process to SIGKILL itself at a seeded moment of `phase`; `report` gets what was under way."""
    from ctelm_jax.run import checkpoint
    from ctelm_jax.train import loop
    from ctelm_jax.weights import elm_export

    active: set[str] = set()
    occurrence = rng.choice((1, 2))
    counts = collections.Counter()

    def die(note: str) -> None:
        report.write_text(json.dumps({"phase": phase, "note": note, "active": sorted(active),
                                      "save_in_flight": saves_in_flight(workdir)}))
        os.kill(os.getpid(), signal.SIGKILL)

    def later(seconds: float, note: str) -> None:
        threading.Timer(seconds, die, (note,)).start()

    def hook(owner, name: str, tag: str, after=None) -> None:
        original = getattr(owner, name)

        def wrapped(*args, **kwargs):
            counts[tag] += 1
            active.add(tag)
            try:
                out = original(*args, **kwargs)
            finally:
                active.discard(tag)
            if after:
                after(counts[tag])
            return out

        setattr(owner, name, wrapped)

    def after_step(n: int) -> None:
        if phase == "step" and n == occurrence:
            later(rng.uniform(0.0, 0.3), f"a random moment after the batch of this life's step #{n} was placed")

    def after_save(n: int) -> None:
        if phase == "save" and n == occurrence:
            die(f"right after this life's save #{n} started (asynchronous)")

    def after_export(n: int) -> None:
        if phase == "export":
            die("after an export's tensors were written, before its folder was put in place")

    hook(loop, "_place_batch", "step", after_step)
    hook(checkpoint.Checkpointer, "save", "save", after_save)
    hook(elm_export, "write_tensors", "export", after_export)
    if phase == "startup":
        later(rng.uniform(0.0, 4.0), "a random moment after the life started")
    elif phase == "validation":
        original = loop.evaluate

        def evaluate(eval_step, *args):
            def step_then_die(*a):
                out = eval_step(*a)
                die("after the first validation batch")
                return out

            active.add("validation")
            return original(step_then_die, *args)

        loop.evaluate = evaluate


def record_resume(report: Path) -> None:
    """Makes this life write the step its checkpointer resumed from (None: from scratch)."""
    from ctelm_jax.run import checkpoint

    original = checkpoint.Checkpointer.resume

    def resume(self, read):
        step, value = original(self, read)
        report.write_text(json.dumps({"resumed": step}))
        return step, value

    checkpoint.Checkpointer.resume = resume


def life(config, workdir: Path, phase: str | None, seed: int, report_dir: Path, index: int) -> int:
    """Forks one life of the run in `workdir` (armed to be killed in `phase` unless None); its wait status."""
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 1
        try:
            from ctelm_jax.train.loop import train

            record_resume(report_dir / f"{index}.resume.json")
            if phase is not None:
                arm(phase, random.Random(seed), workdir, report_dir / f"{index}.kill.json")
            code = 0 if train(config, workdir)["status"] == "finished" else 3
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return os.waitpid(pid, 0)[1]


def run(kills: int, seed: int, out: Path) -> dict:
    """Runs the reference and as many chains as `kills` kills need; returns the summary."""
    from ctelm_jax.train import loop

    config = harness_config()
    tokenizer = loop.load_tokenizer(config.model)  # read once: every life uses this copy
    loop.load_tokenizer = lambda _model_cfg: tokenizer
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    t0 = time.time()
    reference = out / "reference"
    status = life(config, reference, None, 0, out, -1)
    assert status == 0, f"the uninterrupted run failed (wait status {status})"
    # Each phase equally often, in a seeded order.
    schedule = [p for _ in range(-(-kills // len(PHASES))) for p in rng.sample(PHASES, len(PHASES))][:kills]
    lives, chains, index = [], [], 0
    while sum(1 for x in lives if x["killed"]) < kills:
        workdir = out / f"chain{len(chains)}"
        chain = {"workdir": str(workdir), "lives": 0}
        chains.append(chain)
        while True:  # killed lives until `kills` are done, then one left to finish
            done = sum(1 for x in lives if x["killed"])
            phase = schedule[done] if done < kills else None
            before, started = steps_on_disk(workdir), time.time()
            status = life(config, workdir, phase, rng.randrange(2**31), out, index)
            resume = json.loads((out / f"{index}.resume.json").read_text())["resumed"] \
                if (out / f"{index}.resume.json").exists() else "not reached"
            entry = {"life": index, "chain": len(chains) - 1, "phase": phase, "killed": False,
                     "newest_complete_before": before[-1] if before else None, "resumed": resume,
                     "seconds": round(time.time() - started, 1)}
            index += 1
            chain["lives"] += 1
            if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
                entry.update(killed=True, **json.loads((out / f"{entry['life']}.kill.json").read_text()))
                lives.append(entry)
                continue
            assert status == 0, f"life {entry['life']} ended with wait status {status}"
            lives.append(entry)  # the trigger never came: the run finished
            break
    summary = {"kills": sum(1 for x in lives if x["killed"]), "seed": seed, "lives": lives, "chains": chains}
    summary.update(compare(config, reference, [Path(c["workdir"]) for c in chains], lives))
    summary["seconds"] = round(time.time() - t0, 1)
    summary["line"] = (
        f"{summary['kills']} kills: {summary['resumed_as_expected']} resumed from the newest complete checkpoint "
        f"({summary['next_life_killed_before_resuming']} more restarts killed again before resuming), "
        f"final parameters {'identical to' if summary['params_identical'] else 'DIFFERENT from'} the uninterrupted "
        f"run ({len(chains)} chains), {summary['duplicated_rows']} duplicated metric rows")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def compare(config, reference: Path, chains: list[Path], lives: list[dict]) -> dict:
    """What the checks found (after the last fork: reading checkpoints initialises JAX in this process)."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp
    from safetensors.numpy import load_file

    from ctelm_jax.train.metrics import event_scalars

    last = total_steps(config)
    problems: list[str] = []

    def state(workdir: Path) -> dict:
        with ocp.PyTreeCheckpointer() as c:
            tree = c.restore(workdir / "checkpoints" / str(last) / "state")
        return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}

    def rows(workdir: Path) -> list[dict]:
        return [json.loads(line) for line in (workdir / "tb" / "metrics.jsonl").read_text().splitlines()]

    def events(workdir: Path) -> collections.Counter:
        return collections.Counter((step, tag) for p in (workdir / "tb").glob("events.out.tfevents.*")
                                   for step, tag, _ in event_scalars(p.read_bytes()))

    def exports(workdir: Path) -> dict:
        return {p.name: load_file(str(f)) for p in sorted((workdir / "export").iterdir()) if not p.name.startswith(".")
                for f in p.glob("*.safetensors")}

    ref_state, ref_rows, ref_exports = state(reference), rows(reference), exports(reference)
    assert [r["step"] for r in ref_rows] == list(range(1, last + 1)), "the reference's rows"
    identical, duplicated = True, 0
    for workdir in chains:
        got = state(workdir)
        differing = [k for k in ref_state if k not in got or not np.array_equal(got[k], ref_state[k])]
        if differing:
            identical = False
            problems.append(f"{workdir.name}: {len(differing)} state arrays differ, e.g. {differing[0]}")
        got_rows = rows(workdir)
        steps = [r["step"] for r in got_rows]
        duplicated += len(steps) - len(set(steps))
        if steps != list(range(1, last + 1)):
            problems.append(f"{workdir.name}: metrics.jsonl steps {steps}")
        for mine, theirs in zip(got_rows, ref_rows):
            if {k: v for k, v in mine.items() if k not in TIMING_KEYS} != \
                    {k: v for k, v in theirs.items() if k not in TIMING_KEYS}:
                problems.append(f"{workdir.name}: step {mine['step']} logged {mine} vs the reference's {theirs}")
        counts = events(workdir)
        duplicated += sum(n - 1 for n in counts.values())
        if set(step for step, _ in counts) != set(range(1, last + 1)):
            problems.append(f"{workdir.name}: TensorBoard steps {sorted(set(s for s, _ in counts))}")
        got_exports = exports(workdir)
        if got_exports.keys() != ref_exports.keys() or any(
                not all(np.array_equal(got_exports[n][k], ref_exports[n][k]) for k in ref_exports[n])
                for n in ref_exports):
            problems.append(f"{workdir.name}: exports {sorted(got_exports)} differ from {sorted(ref_exports)}")
        litter = [p.name for p in (workdir / "export").iterdir() if p.name.startswith(".")] + \
                 [p.name for p in (workdir / "checkpoints").iterdir() if not p.name.isdigit()]
        if litter:
            problems.append(f"{workdir.name}: left behind {litter}")
    # A life after a kill resumes from the newest checkpoint the killed life left complete.
    by_life = {x["life"]: x for x in lives}
    resumed_ok = before_resume = 0  # before_resume: the next life was killed before it resumed
    for x in lives:
        nxt = by_life.get(x["life"] + 1)
        if not x["killed"] or nxt is None or nxt["chain"] != x["chain"]:
            continue
        if nxt["resumed"] == "not reached":
            before_resume += 1
        elif nxt["resumed"] == nxt["newest_complete_before"]:
            resumed_ok += 1
        else:
            problems.append(f"life {nxt['life']} resumed from {nxt['resumed']}, newest complete was "
                            f"{nxt['newest_complete_before']}")
    landed = collections.Counter(
        ("save in flight" if x["save_in_flight"] and x["phase"] == "save" else x["phase"]) for x in lives if x["killed"])
    return {"resumed_as_expected": resumed_ok, "next_life_killed_before_resuming": before_resume, "params_identical": identical, "duplicated_rows": duplicated,
            "kills_by_phase": dict(landed), "problems": problems}


def main() -> None:
    """Command line: --kills N --seed S --out DIR."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="a new folder for the runs and summary.json")
    args = parser.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Lives compile the same programs: after the reference, they read them from this cache.
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(args.out / "jax_cache"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    sys.path.insert(0, str(REPO))
    summary = run(args.kills, args.seed, args.out)
    print(summary["line"])
    print(json.dumps({k: summary[k] for k in ("kills_by_phase", "problems", "seconds")}))
    sys.exit(1 if summary["problems"] else 0)


if __name__ == "__main__":
    main()
