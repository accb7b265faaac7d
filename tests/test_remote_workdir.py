"""A run whose workdir is gs:// (a GCS emulator on 127.0.0.1): SIGTERM mid-run, resume, export, decode, evaluate.

The emulator (PyPI gcp-storage-emulator, in memory, plus the generation header tests/gcs_emulator.py adds) serves
the JSON API that gcsfs (epath's gs:// backend: config, logs, embeddings, exports, evaluation) and tensorstore
(orbax's checkpoints) both speak, so the remote run goes through the same gs:// code as on Google Cloud Storage.
It does not show GCS's latency, its behaviour with several hosts writing at once, or authentication.
"""

import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from absl import flags
from etils import epath
from flax import nnx, traverse_util

from configs import tiny
from ctelm_jax import decode, export, fs
from ctelm_jax.data.corpus import load_records
from ctelm_jax.data.embeddings import embed_corpus
from ctelm_jax.data.render import render_text
from ctelm_jax.errors import UserError
from ctelm_jax.eval.suite import EvalSizes, evaluate_run
from ctelm_jax.run.checkpoint import Checkpointer
from ctelm_jax.run.trained import load_trained
from ctelm_jax.train import workdir_lock
from ctelm_jax.train.loop import train
from ctelm_jax.train.metrics import tfrecords
from ctelm_jax.weights.elm_export import adapter_to_hf, import_elm
from ctelm_jax.weights.hf import decoder_to_hf
from conftest import free_port, metric_rows, sigterm_once_logged
from test_rerank import flags_for

REPO = Path(__file__).resolve().parents[1]
BUCKET = "ctelm-test"
MAX_RECORDS = 200  # enough trials in each group of the built-in concepts the evaluation computes
STEPS = 8  # configs/tiny.py: two stages of 4
EMULATOR_START_S = 60


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    """gs://ctelm-test served in memory by an emulator process on a loopback port (tests/gcs_emulator.py), with
    gcsfs and tensorstore pointed at it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("emulator") / "emulator.log"
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, str(Path(__file__).with_name("gcs_emulator.py")), str(port), BUCKET],
                                  stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + EMULATOR_START_S
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, f"no emulator: {log.read_text()[-2000:]}"
                time.sleep(0.1)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("STORAGE_EMULATOR_HOST", url)
            mp.setenv("TENSORSTORE_GCS_HTTP_URL", url)
            mp.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")  # tensorstore's test credentials: no lookup
            mp.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # plain gcsfs, no bucket-type probe
            yield f"gs://{BUCKET}"
    finally:
        server.terminate()
        server.wait(timeout=30)


class HashEncoder:
    """A deterministic stand-in sentence encoder: 32-d unit vectors seeded by each text's hash."""

    name, pooling, normalize, max_length, dim = "hash-encoder", "mean", True, 0, 32

    def encode(self, texts, batch_size=64, progress=None):
        out = []
        for t in texts:
            v = np.random.default_rng(int.from_bytes(hashlib.sha256(t.encode()).digest()[:4], "little"))
            out.append(v.standard_normal(self.dim))
        if progress:
            progress(len(texts))
        out = np.asarray(out, np.float32).reshape(-1, self.dim)
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def config():
    """configs/tiny.py on a small corpus slice, embedded into `<workdir>/embeddings`, exporting at the last step."""
    c = tiny.get_config()
    c.data.max_records = MAX_RECORDS
    c.data.embeddings = ""
    c.export.every_steps = STEPS
    return c


def prepare(workdir) -> None:
    """Embeds the run's records into its workdir cache (as training would with a real encoder)."""
    embed_corpus(load_records()[:MAX_RECORDS], HashEncoder(), fs.as_path(workdir) / "embeddings" / "corpus",
                 render_text, chunk_size=50, show_progress=False)


def flat_params(trained) -> dict:
    state = nnx.to_pure_dict(nnx.state(trained.model))
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(state).items()}


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


def no_mangled_folders() -> list[str]:
    """Local 'gs:' folders (what pathlib makes of gs://) in the cwd, the temp folder and the repository."""
    return [str(d / "gs:") for d in (Path.cwd(), Path(tempfile.gettempdir()), REPO) if (d / "gs:").exists()]


@pytest.mark.slow
def test_remote_run_resumes_exports_and_evaluates(bucket, tmp_path):
    local = tmp_path / "local"
    prepare(local)
    assert train(config(), local)["status"] == "finished"
    reference = load_trained(local)

    remote = f"{bucket}/runs/tiny"
    prepare(remote)
    sigterm_once_logged(remote, 3).join(0)
    assert train(config(), remote)["status"] == "preempted"
    ckpt = Checkpointer(f"{remote}/checkpoints")
    saved = ckpt.latest_step()
    ckpt.close()
    assert 3 <= saved < STEPS  # saved where the signal landed, mid-run, in the bucket
    assert [r["step"] for r in metric_rows(remote)] == list(range(1, saved + 1))
    assert train(config(), remote)["status"] == "finished"

    # The resumed remote run equals the uninterrupted local one: the log (appended across both processes' runs
    # through the upload-on-write mirror) and the final parameters, bit for bit (same arithmetic on the same data).
    rows, local_rows = metric_rows(remote), metric_rows(local)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r, ref in zip(rows, local_rows):
        assert (r["loss"], r["grad_norm"]) == (ref["loss"], ref["grad_norm"]), r["step"]
    resumed = load_trained(remote)
    assert resumed.step == reference.step == STEPS
    assert_identical(flat_params(resumed), flat_params(reference))
    root = fs.as_path(remote)
    assert json.loads((root / "summary.json").read_text())["step"] == STEPS
    assert json.loads((root / "config.json").read_text())["data"]["max_records"] == MAX_RECORDS
    assert (root / "embeddings" / "corpus.npy").is_file() and not (root / "embeddings" / "corpus.partial").exists()
    assert [p.name for p in (root / "tb").iterdir() if p.name.startswith("events.out.tfevents")]

    # The periodic export (written by the training loop) and the export CLI, both into the bucket, load back.
    periodic = root / "export" / f"step_{STEPS}"
    back, _ = import_elm(periodic)
    assert_identical(decoder_to_hf(back.decoder), decoder_to_hf(resumed.model.decoder, merge_lora=True))
    fv = flags.FlagValues()
    export.define_flags(fv)
    fv(["export", f"--checkpoint={remote}", f"--out={bucket}/hf", "--lora=peft"])
    out = export.run(fv)
    assert str(out) == f"{bucket}/hf"
    assert json.loads((out / "config.json").read_text())["encoder"] == "hash-encoder"
    assert sorted(p.name for p in fs.as_path(bucket).iterdir()) == ["hf", "runs"]  # no staging prefix left
    back, _ = import_elm(out)
    assert_identical(decoder_to_hf(back.decoder, merge_lora=False), decoder_to_hf(resumed.model.decoder, False))
    assert_identical(adapter_to_hf(back.adapter), adapter_to_hf(resumed.model.adapter))

    # Decoding and the evaluation read the run from the bucket and write there.
    vectors = fs.as_path(bucket) / "inputs" / "two.npy"
    with vectors.open("wb") as f:
        np.save(f, HashEncoder().encode(["a trial", "another trial"]))
    decode.decode(flags_for(remote, vectors, f"{remote}/decoded.jsonl", steps=2, max_new_tokens=4, batch_size=2,
                            rerank=0))
    assert len((root / "decoded.jsonl").read_text().splitlines()) == 2
    sizes = EvalSizes(n_test=2, max_new_tokens=6, batch_size=2, n_attribute=1, attribute_max_new_tokens=4,
                      n_concept=1, concept_max_new_tokens=4, strengths=(1.0,), n_novel=1, rerank_candidates=0)
    markdown = evaluate_run(remote, sizes, encode=HashEncoder().encode)
    assert f"| ELM (step {STEPS}) |" in markdown
    assert (root / "eval" / "report.md").read_text() == markdown
    assert json.loads((root / "eval" / "metrics.json").read_text())["step"] == STEPS
    for png in ("cosine_hist.png", "concept_curves.png"):
        assert (root / "eval" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert (root / "concepts.npz").is_file() and (root / "eval" / "samples.jsonl").is_file()
    assert no_mangled_folders() == []


def test_as_path_keeps_uris_and_refuses_mangled_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert str(fs.as_path("gs://b/run") / "checkpoints") == "gs://b/run/checkpoints"
    assert fs.as_path(epath.Path("gs://b/run")) == fs.as_path("gs://b/run")
    assert fs.as_path("run") == tmp_path / "run" and fs.is_remote("gs://b") and not fs.is_remote(tmp_path)
    with pytest.raises(ValueError, match="lost one slash"):
        fs.as_path(Path("gs://b/run"))  # pathlib already made it gs:/b/run


def tfrecord_count(data: bytes) -> int:
    """The number of records in a TFRecord (event) file, checking its framing (length, crc, data, crc)."""
    frames = list(tfrecords(data))
    assert sum(map(len, frames)) == len(data), "truncated record"
    return len(frames)


def test_workdir_lock_in_a_bucket(bucket):
    workdir = fs.as_path(f"{bucket}/locked")
    with workdir_lock.hold(workdir):
        holder = workdir_lock.read_lock(workdir)
        assert holder is not None and holder.pid == os.getpid()
        with pytest.raises(UserError, match=f"in use by another run: pid {os.getpid()}"):
            workdir_lock.acquire(workdir)
    assert workdir_lock.read_lock(workdir) is None
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (workdir / workdir_lock.LOCK_FILE).write_text(json.dumps({**vars(holder), "pid": gone.pid}))
    assert workdir_lock.acquire(workdir).pid == os.getpid()  # stale: taken over


def test_logs_reach_the_bucket_at_every_write(bucket):
    from ctelm_jax.train.metrics import EventWriter, event_scalars

    logdir = fs.as_path(bucket) / "logs"
    writer = EventWriter(logdir)
    for step in (1, 2, 3):  # the first upload is whole, the next ones append
        writer.write(step, {"loss": 1.0 / step, "lr": 0.1})
        rows = [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1] == {"step": step, "loss": 1.0 / step, "lr": 0.1} and len(rows) == step  # a kill loses none
        (events,) = [p for p in logdir.iterdir() if p.name.startswith("events.out.tfevents")]
        assert tfrecord_count(events.read_bytes()) == 1 + 2 * step  # the file-version record, then one per scalar
    writer.close()
    again = EventWriter(logdir, resume_step=3)  # a run resumed at step 3 appends to the same log
    again.write(4, {"loss": 0.2})
    again.close()
    assert [json.loads(line)["step"] for line in (logdir / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert sorted(p.name.startswith("events") for p in logdir.iterdir()) == [False, True, True]  # no tail objects
    third = EventWriter(logdir, resume_step=2)  # killed before step 4 was saved: its rows go, in the bucket too
    third.write(3, {"loss": 0.3})
    third.close()
    assert [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines()][2:] == [
        {"step": 3, "loss": 0.3}]
    scalars = sorted(s for p in logdir.iterdir() if p.name.startswith("events")
                     for s in event_scalars(p.read_bytes()) if s[1] == "loss")
    assert [(step, value) for step, _, value in scalars] == [(1, 1.0), (2, 0.5), (3, np.float32(0.3))]


def test_publish_dir_replaces_a_remote_folder_or_leaves_it(bucket, tmp_path, monkeypatch):
    dest = fs.as_path(bucket) / "published"
    for name, text in (("config.json", "old"), ("old.bin", "old")):
        (dest / name).write_text(text)
    new = tmp_path / "new"
    (new / "sub").mkdir(parents=True)
    for name in ("config.json", "a.bin", "sub/b.bin"):
        (new / name).write_text(f"new {name}")
    copy = fs.copy_file
    calls = []

    def failing_copy(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("network down")
        copy(src, dst)

    monkeypatch.setattr(fs, "copy_file", failing_copy)
    with pytest.raises(OSError, match="network down"):
        fs.publish_dir(new, dest, last="config.json")
    assert sorted(p.name for p in fs.as_path(bucket).iterdir() if "published" in p.name) == ["published"]
    assert (dest / "config.json").read_text() == "old"  # the upload failed before dest was touched
    monkeypatch.setattr(fs, "copy_file", copy)
    fs.publish_dir(new, dest, last="config.json")
    assert sorted(p.name for p in fs.as_path(bucket).iterdir() if "published" in p.name) == ["published"]
    assert sorted(p.name for p in dest.iterdir()) == ["a.bin", "config.json", "sub"]
    assert (dest / "sub" / "b.bin").read_text() == "new sub/b.bin"
    assert (dest / "config.json").read_text() == "new config.json"
