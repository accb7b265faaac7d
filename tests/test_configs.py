"""Every shipped config trains: each `configs/*.py` as shipped, with only the decoder's size replaced by a tiny
shape of the same family, runs 2 steps of every stage on the 8 fake CPU devices; and the configs that need model
folders say which flag is missing in one line."""

import importlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ctelm_jax.parallel.mesh import MESH_AXES
from ctelm_jax.run.build import decoder_config
from ctelm_jax.train.loop import train
from conftest import metric_rows

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p.stem for p in (REPO / "configs").glob("*.py") if p.stem not in ("__init__", "base"))
STEPS_PER_STAGE = 2
DEVICES = 8
# The size of the stand-in decoder; every other architecture field (RoPE and its scaling, norm eps, tied head, special
# tokens) comes from the shipped decoder. The vocabulary is the embedded tokenizer's (the only one available offline).
TINY_SIZE = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=0)
FAMILY_FIELDS = ("rope_theta", "rope_scaling", "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings")


def shipped(name: str):
    """The config `configs/<name>.py` exactly as shipped."""
    return importlib.import_module(f"configs.{name}").get_config()


def family(model_cfg) -> dict:
    """The shipped decoder's non-size architecture fields: from its declared `arch`, else its folder's config.json."""
    if model_cfg.arch:
        arch = model_cfg.arch.to_dict()
        return {k: arch[k] for k in FAMILY_FIELDS if k in arch}
    cfg = decoder_config(model_cfg)
    out = {k: getattr(cfg, k) for k in FAMILY_FIELDS}
    out["rope_scaling"] = None if cfg.rope_scaling is None else vars(cfg.rope_scaling)
    return out


def fit_mesh(sizes: dict[str, int]) -> dict[str, int]:
    """The shipped mesh on 8 devices: fsdp and tensor as shipped where they divide what is left, else their largest
    divisor that does; data takes the remaining devices."""
    if -1 in (sizes["fsdp"], sizes["tensor"]):
        return {**sizes, "data": 1}
    out, left = {"data": -1}, DEVICES
    for axis in ("tensor", "fsdp"):
        out[axis] = math.gcd(sizes[axis], left)
        left //= out[axis]
    return out


def shrunk(name: str):
    """The shipped config with a tiny decoder of its family, random embeddings, 2 steps a stage, a mesh that fits 8
    devices, and a batch that fits this machine; stages, tasks, trainable groups, rules, dtypes, scan and remat as
    shipped."""
    c = shipped(name)
    c.model.arch = {**family(c.model), **TINY_SIZE, "max_position_embeddings": 512}
    c.model.decoder, c.model.tokenizer = "random", "default"
    c.model.adapter_hidden = 64
    c.data.embeddings, c.data.max_records = "random", 600  # the offset task's concept groups all need trials
    c.data.seq_len, c.data.global_batch_size = 64, DEVICES
    c.mesh.update(fit_mesh({a: int(c.mesh[a]) for a in MESH_AXES}))
    for stage in c.stages:
        stage["steps"] = STEPS_PER_STAGE
    c.checkpoint.every_steps = STEPS_PER_STAGE
    c.eval.every_steps, c.eval.batches = STEPS_PER_STAGE, 1
    return c


@pytest.mark.slow
@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_trains_every_stage(name, tmp_path):
    config = shrunk(name)
    as_shipped = shipped(name)
    for key in ("dtype", "param_dtype", "frozen_dtype", "scan_layers", "remat_policy", "lora_rank", "lora_targets"):
        assert config.model[key] == as_shipped.model[key], key
    keep = ("name", "tasks", "trainable", "learning_rate")
    assert [{k: s[k] for k in keep} for s in config.stages] == [{k: s[k] for k in keep} for s in as_shipped.stages]

    summary = train(config, tmp_path)
    total = STEPS_PER_STAGE * len(config.stages)
    assert summary["status"] == "finished" and summary["step"] == total
    rows = metric_rows(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, total + 1))
    assert all(np.isfinite(r["loss"]) and r["target_tokens"] > 0 for r in rows)
    # Each stage ran validation on its own tasks at its last step.
    for i, stage in enumerate(config.stages):
        last = rows[STEPS_PER_STAGE * (i + 1) - 1]
        assert np.isfinite(last["val/loss"]), (stage["name"], last)


def run_train(*flags: str) -> subprocess.CompletedProcess:
    """`python -m ctelm_jax.train` with `flags`, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "ctelm_jax.train", *flags], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("name", [n for n in SHIPPED if not shipped(n).model.decoder])
def test_folder_flags_are_named_in_one_line(name, tmp_path):
    """The 8B configs ship without model folders: each missing one stops the run with one line naming its flag."""
    workdir = tmp_path / "run"
    config = f"--config=configs/{name}.py"
    out = run_train(config, f"--workdir={workdir}")
    assert out.returncode != 0
    assert out.stderr.strip().splitlines() == [
        "ctelm_jax.train: error: model.decoder is not set: pass --config.model.decoder=PATH, a Hugging Face Llama "
        "folder (config.json + safetensors + tokenizer)."]

    decoder = tmp_path / "decoder"  # the start-up check reads config.json and sees that the weights file is there
    decoder.mkdir()
    (decoder / "config.json").write_text(json.dumps(decoder_config(shipped(name).model).to_hf_dict()))
    (decoder / "model.safetensors").touch()
    out = run_train(config, f"--workdir={workdir}", f"--config.model.decoder={decoder}",
                    f"--config.data.encoder={tmp_path / 'missing'}")
    assert out.returncode != 0
    [line] = out.stderr.strip().splitlines()
    assert line.startswith(f"ctelm_jax.train: error: data.encoder={tmp_path / 'missing'}: the folder does not exist;")
    assert "--config.data.encoder=PATH" in line
    assert not workdir.exists()  # nothing written before the check
