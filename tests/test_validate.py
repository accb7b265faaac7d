"""A training config is checked before any work: each bad value is one UserError naming the key and the fix."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from configs import tiny
from ctelm_jax.errors import UserError
from ctelm_jax.train.validate import check_config

REPO = Path(__file__).resolve().parents[1]


def _set(config, key: str, value) -> None:
    section, _, name = key.rpartition(".")
    (config[section] if section else config)[name] = value


@pytest.mark.parametrize("changes, message", [
    ({"data.seq_len": 0}, "data.seq_len=0: must be positive; set --config.data.seq_len"),
    ({"data.seq_len": 1024}, "data.seq_len=1024: longer than the decoder's 512 positions"),
    ({"data.global_batch_size": -8}, "data.global_batch_size=-8: must be positive"),
    ({"data.global_batch_size": 12}, "data.global_batch_size=12: not divisible by the 8 batch shards of the mesh "
                                     "(data=8 x fsdp=1); set --config.data.global_batch_size to a multiple of 8"),
    ({"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "data.global_batch_size": 6}, "not divisible by the 4 batch"),
    ({"mesh.fsdp": 0}, "mesh.fsdp=0: an axis size is a number of devices (or -1: the devices left); set "
                       "--config.mesh.fsdp"),
    ({"mesh.data": 3}, "needs 3 devices but 8 are present"),
    ({"mesh.data": 4, "mesh.fsdp": 4}, "needs 16 devices but 8 are present"),
    ({"checkpoint.every_steps": 0}, "checkpoint.every_steps=0: must be positive"),
    ({"log_every": 0}, "log_every=0: must be positive"),
    ({"eval.every_steps": -1}, "eval.every_steps=-1: must be >= 0"),
    ({"data.max_records": -2}, "data.max_records=-2: must be >= 0"),
    ({"model.tokens_per_embedding": 0}, "model.tokens_per_embedding=0: must be positive; set "
                                        "--config.model.tokens_per_embedding to a number >= 1"),
    ({"model.attention": "flash"}, "model.attention='flash'; choose one of auto, xla, splash, cudnn"),
    ({"model.attention": "cudnn"}, "model.attention='cudnn' needs a 16-bit compute dtype, not model.dtype='float32'"),
    ({"model.loss_chunk": -128}, "model.loss_chunk=-128: must be >= 0 (0 = off / all); set --config.model.loss_chunk"),
    ({"concepts.method": "pca"}, "concepts.method='pca': use one of centroid, edit_pair; set "
                                 "--config.concepts.method=centroid or edit_pair"),
    ({"concepts.n_trials": 1}, "concepts.n_trials=1: an edit-pair vector averages at least 2 trials"),
])
def test_bad_value_is_named_with_its_fix(changes, message):
    config = tiny.get_config()
    for key, value in changes.items():
        _set(config, key, value)
    with pytest.raises(UserError) as e:
        check_config(config, num_devices=8)
    assert message in str(e.value)


@pytest.mark.parametrize("stage_change, message", [
    ({"steps": 0}, "stage 'align': steps=0; a stage runs a positive number of steps"),
    ({"learning_rate": 0.0}, "stage 'align': learning_rate=0.0; set a positive learning rate"),
    ({"learning_rate": -1e-3}, "stage 'align': learning_rate=-0.001"),
    ({"tasks": {"summarise": 1.0}}, "stage 'align': tasks ['summarise'] not among"),
])
def test_bad_stage_is_named(stage_change, message):
    config = tiny.get_config()
    config.stages[0].update(stage_change)
    with pytest.raises(UserError, match="stage") as e:
        check_config(config, num_devices=8)
    assert message in str(e.value)


def test_shipped_tiny_config_passes():
    check_config(tiny.get_config(), num_devices=8)
    check_config(tiny.get_config(), num_devices=1)


def test_bad_value_stops_the_program_at_once_with_one_line(tmp_path):
    """The report's case: seq_len=-5 used to write the workdir and spin for ever; now one line, exit 2, no files."""
    workdir = tmp_path / "x2"
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "ctelm_jax.train", "--config=configs/tiny.py", f"--workdir={workdir}",
                          "--config.data.seq_len=-5"], cwd=REPO, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - t0
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.strip().splitlines() == [
        "ctelm_jax.train: error: data.seq_len=-5: must be positive; set --config.data.seq_len to a number >= 1."]
    assert not workdir.exists()
    assert elapsed < 60  # start-up (imports) and the check only; no training
