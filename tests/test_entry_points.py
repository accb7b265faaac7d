"""Every entry point runs as a user runs it: `python -m ctelm_jax.main` trains and evaluates a tiny run (real corpus
embeddings from the embedded encoder), then decode, evaluate, export and the PyTorch-side tools work on that run.
(`train`, `embed`, `sizing`, `aot` and `data.ctgov` run as programs in their own tests; export and embed are also
given bad paths here, which each must report as one line.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 900


def run(module: str, *flags: str) -> str:
    """`python -m <module> <flags>` from the repo root; fails the test with its output unless it exits 0."""
    out = subprocess.run([sys.executable, "-m", module, *flags], cwd=REPO, capture_output=True, text=True,
                         timeout=TIMEOUT_S)
    assert out.returncode == 0, f"{module} exited {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    return out.stdout


@pytest.fixture(scope="module")
def workdir(main_run) -> Path:
    """A tiny run made by the README's main job: training, then the evaluation report it points to."""
    workdir, printed = main_run[0], main_run[1].stdout
    assert "| ELM (step 8) |" in (workdir / "eval" / "report.md").read_text()
    assert f"  report {workdir / 'eval' / 'report.md'}" in printed
    return workdir


@pytest.mark.slow
def test_main_trains_evaluates_and_explores(workdir):
    assert (workdir / "embeddings" / "corpus.npy").is_file()
    assert json.loads((workdir / "summary.json").read_text())["step"] == 8
    metrics = json.loads((workdir / "eval" / "metrics.json").read_text())
    assert metrics["step"] == 8 and metrics["describe"]["ELM"]["cosine"]["n"] > 0
    page = (workdir / "explore" / "index.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "plotly" in page.lower()
    assert (workdir / "explore" / "map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_decode_and_evaluate_programs(workdir, tmp_path):
    ids = json.loads((workdir / "embeddings" / "corpus.ids.json").read_text())
    out = tmp_path / "decoded.jsonl"
    run("ctelm_jax.decode", f"--workdir={workdir}", "--mode=describe", f"--nctids={ids[0]},{ids[1]}",
        "--max_new_tokens=8", f"--out={out}")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and all(r["step"] == 8 for r in rows)
    run("ctelm_jax.decode", f"--workdir={workdir}", "--mode=describe", f"--nctids={ids[0]}", "--max_new_tokens=8",
        "--rerank=3", f"--out={out}")
    [row] = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(row["candidate_cosines"]) == 3 and row["cosine"] == max(row["candidate_cosines"])
    # A neighbour draft (the run did not train revise: the rows show the machinery, not its quality), through the
    # run's real encoder; the program's library INFO goes to the run's log file, not the console.
    logged = (workdir / "log.txt").read_text()
    printed = run("ctelm_jax.decode", f"--workdir={workdir}", "--mode=describe", f"--nctids={ids[0]}",
                  "--max_new_tokens=8", "--draft=neighbour", "--rounds=1", f"--out={out}")
    [row] = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["draft_source"] in ids and row["draft_source"] != ids[0] and row["round"] == 1
    assert row["cosine"] == row["round_cosines"][0] and -1 <= row["draft_cosine"] <= 1
    grown = (workdir / "log.txt").read_text()
    assert grown.startswith(logged) and "orbax" in grown[len(logged):] and "orbax" not in printed

    report = run("ctelm_jax.evaluate", f"--workdir={workdir}", "--n_test=2", "--max_new_tokens=8", "--n_attribute=1",
                 "--attribute_max_new_tokens=4", "--n_concept=1", "--concept_max_new_tokens=8", "--strengths=-1,1",
                 "--n_novel=1", "--rerank_candidates=2")
    assert "| ELM (step 8) |" in report and "| ELM, re-ranked (n=2) |" in report


@pytest.mark.slow
def test_export_and_pytorch_tools(workdir, tmp_path):
    hf = tmp_path / "hf"
    run("ctelm_jax.export", f"--checkpoint={workdir}", f"--out={hf}", "--lora=peft")
    assert (hf / "config.json").is_file() and (hf / "adapter_config.json").is_file()
    np.save(tmp_path / "e.npy", np.load(workdir / "embeddings" / "corpus.npy")[:1])
    text = run("ctelm_jax.hf.reference", f"--model={hf}", f"--embeddings={tmp_path / 'e.npy'}",
               "--prompt=Describe the clinical trial <|embedding|>.", "--max_new_tokens=8")
    assert text.strip()
    run("ctelm_jax.hf.check_export", f"--workdir={workdir}", f"--export={hf}", "--n=2", "--max_new_tokens=8")


def fails_with_one_line(module: str, *flags: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m <module> <flags>`, which must exit 2 with a single `<module>: error: ...` line on stderr."""
    out = subprocess.run([sys.executable, "-m", module, *flags], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env={**os.environ, **(env or {})})
    assert out.returncode == 2, f"{module} exited {out.returncode}\n{out.stderr[-5000:]}"
    [line] = out.stderr.strip().splitlines()
    assert line.startswith(f"{module}: error: ") and "Traceback" not in out.stderr
    return out


def test_export_of_a_missing_run_is_one_line(tmp_path):
    out = fails_with_one_line("ctelm_jax.export", f"--checkpoint={tmp_path / 'nope'}", f"--out={tmp_path / 'hf'}")
    assert "not a ctelm_jax run directory (no config.json); pass the --workdir of a run." in out.stderr
    assert not (tmp_path / "hf").exists()
    # CTELM_TRACEBACK=1 gives the traceback behind the line.
    full = subprocess.run([sys.executable, "-m", "ctelm_jax.export", f"--checkpoint={tmp_path / 'nope'}",
                           f"--out={tmp_path / 'hf'}"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CTELM_TRACEBACK": "1"})
    assert full.returncode != 0 and "Traceback" in full.stderr and "MissingInput" in full.stderr


@pytest.mark.parametrize("flag, message", [
    ("--corpus={tmp}/nope.jsonl", "nope.jsonl: no such corpus file; pass a .jsonl(.gz) of trial records"),
    ("--encoder={tmp}/no_encoder", "no_encoder: no such encoder folder; pass a sentence-transformers/HF BERT folder."),
])
def test_embed_with_a_bad_path_is_one_line(tmp_path, flag, message):
    out = fails_with_one_line("ctelm_jax.embed", flag.format(tmp=tmp_path), f"--out={tmp_path / 'emb'}")
    assert message in out.stderr
    assert not list(tmp_path.glob("emb*"))


def test_decode_strengths_that_are_not_numbers_are_one_line(tmp_path):
    out = fails_with_one_line("ctelm_jax.decode", f"--workdir={tmp_path}", "--mode=concept", "--concept=age",
                              "--nctids=NCT00000102", "--strengths=abc")
    assert "--strengths=abc: not a list of numbers; pass comma-separated numbers, e.g. --strengths=" in out.stderr


def test_workdir_of_another_config_is_one_line(tmp_path):
    """A workdir whose checkpoints hold configs/tiny.py's model, trained on with another adapter width."""
    from configs.tiny import get_config
    from ctelm_jax.run.build import model_signature
    from ctelm_jax.run.checkpoint import Checkpointer

    ckpt = Checkpointer(tmp_path / "checkpoints", async_save=False)
    ckpt.save(2, {"step": np.int32(2)}, {}, {"stage": 0, "step": 2}, model_signature(get_config().model))
    ckpt.close()
    out = fails_with_one_line("ctelm_jax.train", "--config=configs/tiny.py", f"--workdir={tmp_path}",
                              "--config.model.adapter_hidden=48")
    assert (f"ctelm_jax.train: error: --workdir={tmp_path} holds checkpoints of a different model (adapter_hidden: "
            "checkpoint 64 vs config 48); pass a new --workdir, or set the config back") in out.stderr
