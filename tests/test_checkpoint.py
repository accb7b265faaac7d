"""Damaged checkpoints: training resumes from the newest readable step, loading a trained model stops naming it."""

import logging
import re
from pathlib import Path

import pytest

from configs import tiny
from conftest import write_step0_run
from ctelm_jax.errors import UserError
from ctelm_jax.run.checkpoint import DAMAGED_DIR, DamagedCheckpoint
from ctelm_jax.run.trained import load_trained
from ctelm_jax.train.loop import train


def steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def truncate_state(step_dir: Path) -> None:
    """Cuts the state item's largest tensorstore file to half its length (a copy stopped mid-file)."""
    biggest = max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])


def garble_progress(step_dir: Path) -> None:
    """Overwrites the progress JSON item with bytes that are not JSON."""
    (step_dir / "progress" / "metadata").write_bytes(b"\x00{garbled")


def resume_warnings(workdir: Path, caplog) -> str:
    """Resumes the run to its end and returns its warnings."""
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        summary = train(tiny.get_config(), workdir)
    assert summary["status"] == "finished" and summary["step"] == 8
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def test_train_resumes_from_the_newest_readable_step(tmp_path, caplog):
    c = tiny.get_config()
    c.checkpoint.every_steps = 4
    assert train(c, tmp_path)["status"] == "finished"
    assert steps(tmp_path) == [4, 8]
    truncate_state(tmp_path / "checkpoints" / "8")
    warned = resume_warnings(tmp_path, caplog)
    assert re.search(r"step 8 .* is damaged: ValueError: .*byte range.*resuming from step 4", warned), warned
    assert (tmp_path / DAMAGED_DIR / "8" / "state").is_dir()  # kept aside, out of the way of the new step 8
    assert steps(tmp_path)[-2:] == [6, 8]
    garble_progress(tmp_path / "checkpoints" / "8")
    warned = resume_warnings(tmp_path, caplog)
    assert re.search(r"step 8 .* is damaged: JSONDecodeError: .*resuming from step 6", warned), warned
    assert (tmp_path / DAMAGED_DIR / "8.1").is_dir()


def test_no_readable_step_refuses_instead_of_restarting(tmp_path):
    write_step0_run(tmp_path, 4)
    write_step0_run(tmp_path, 8)
    for step in (4, 8):
        garble_progress(tmp_path / "checkpoints" / str(step))
    with pytest.raises(UserError, match=r"no checkpoint .* can be read \(step 8: .*; step 4: .*move the damaged"):
        train(tiny.get_config(), tmp_path)
    assert steps(tmp_path) == [4, 8]


def delete_state_manifest(step_dir: Path) -> None:
    """Removes the state item's OCDBT manifest (a copy that missed a file)."""
    (step_dir / "state" / "manifest.ocdbt").unlink()


@pytest.mark.parametrize("damage", [truncate_state, delete_state_manifest])
def test_load_trained_names_the_damaged_and_the_good_step(tmp_path, damage):
    write_step0_run(tmp_path, 4)
    write_step0_run(tmp_path, 8)
    damage(tmp_path / "checkpoints" / "8")
    with pytest.raises(DamagedCheckpoint, match=r"step 8 .*damaged: \w+: .*step 4 reads fine: pass --step 4") as e:
        load_trained(tmp_path)
    assert isinstance(e.value, UserError) and e.value.step == 8
    assert load_trained(tmp_path, step=4).step == 4
    with pytest.raises(DamagedCheckpoint, match="step 8"):
        load_trained(tmp_path, step=8)
