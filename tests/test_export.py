"""Export to Hugging Face folders: PyTorch parity, round trips back into ctelm_jax, and refusal of bad input."""

import errno
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from absl import flags
from flax import nnx, traverse_util

from configs import tiny
from conftest import pickle_trap
from ctelm_jax import export, prompts
from ctelm_jax.errors import UserError
from ctelm_jax.generate import generate
from ctelm_jax.hf import reference
from ctelm_jax.models.adapter import Adapter, set_standardisation
from ctelm_jax.models.elm import ELM
from ctelm_jax.models.llama import Llama, LlamaConfig
from ctelm_jax.run.build import build_elm, load_tokenizer
from ctelm_jax.run.checkpoint import Checkpointer, CheckpointMismatch, restore_params
from ctelm_jax.run.export import export_run, maybe_export
from ctelm_jax.weights import hf
from ctelm_jax.weights.elm_export import export_elm, import_elm
from ctelm_jax.weights.hf import INDEX_FILE, CheckpointError, decoder_to_hf, lora_to_peft, read_tensors
from ctelm_jax.weights.tokenizer import Tokenizer

DOMAIN, HIDDEN = 32, 48
CFG = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                  tie_word_embeddings=False, lora_rank=4, lora_alpha=8.0,
                  lora_targets=("q_proj", "k_proj", "v_proj", "down_proj"))
PROMPTS = ("Describe the clinical trial <|embedding|>.", "Compare <|embedding|> with <|embedding|>.")


def randomize(model: nnx.Module, seed: int = 0) -> None:
    """Weights large enough to make every path matter: norms ~1, others ~0.15, LoRA B non-zero (so merging counts)."""
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        shape = var[...].shape
        value = 1.0 + 0.1 * rng.standard_normal(shape) if "norm" in path else 0.15 * rng.standard_normal(shape)
        var[...] = jnp.asarray(0.3 * value if path[-1] == "b" else value, var[...].dtype)


def make_elm(tokenizer: Tokenizer, cfg: LlamaConfig = CFG, standardised: bool = False) -> ELM:
    """A random ELM; `standardised` gives its adapter input statistics of a random corpus (export folds them)."""
    rngs = nnx.Rngs(0)
    model = ELM(Llama(cfg, rngs=rngs), Adapter(DOMAIN, HIDDEN, cfg.hidden_size, rngs=rngs), tokenizer.placeholder_id)
    randomize(model)
    if standardised:
        corpus = np.random.default_rng(1).standard_normal((64, DOMAIN)) * 0.05 + 0.3
        set_standardisation(model.adapter, corpus)
    return model


def flat_params(model: nnx.Module) -> dict:
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model))).items()}


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


def siblings(path) -> list[str]:
    """The names in `path`'s parent folder (to catch temporary folders left behind)."""
    return sorted(p.name for p in path.parent.iterdir())


@pytest.fixture(scope="module")
def elm(tokenizer) -> ELM:
    return make_elm(tokenizer)


def encode(tokenizer: Tokenizer, prompt: str) -> list[int]:
    return tokenizer.encode(tokenizer.chat([{"role": "user", "content": prompt}]))


def jax_greedy(model: ELM, ids: list[int], embeddings: np.ndarray, max_new: int, eos: tuple[int, ...]) -> list[int]:
    """Greedy decoding by recomputing the full forward over a fixed-size buffer (one compile)."""
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, t, e: nnx.merge(graphdef, s)(t, e)[0])
    buf = np.zeros((1, len(ids) + max_new), np.int32)
    buf[0, :len(ids)] = ids
    out: list[int] = []
    for cur in range(len(ids), len(ids) + max_new):
        token = int(np.argmax(forward(state, buf, embeddings[None])[0, cur - 1]))
        out.append(token)
        buf[0, cur] = token
        if token in eos:
            break
    return out


def right_padded(ids: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token rows right-padded to the longest, and the mask of real tokens."""
    tokens = np.full((len(ids), max(map(len, ids))), pad_id, np.int32)
    mask = np.zeros(tokens.shape, np.int32)
    for row, seq in enumerate(ids):
        tokens[row, :len(seq)], mask[row, :len(seq)] = seq, 1
    return tokens, mask


def both_logits(elm, loaded, tokens: np.ndarray, mask: np.ndarray,
                embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ctelm_jax's logits and the PyTorch reference's (its adapter spliced into input embeddings), one batch."""
    ours = np.asarray(elm(jnp.asarray(tokens), jnp.asarray(embeddings), segment_ids=jnp.asarray(mask))[0])
    with torch.no_grad():
        embeds = reference.embed_inputs(loaded.model, loaded.adapter, torch.tensor(tokens, dtype=torch.long),
                                        torch.tensor(embeddings))
        theirs = loaded.model(inputs_embeds=embeds, attention_mask=torch.tensor(mask)).logits.numpy()
    return ours, theirs


@pytest.mark.parametrize("lora, tied", [("merge", False), ("peft", False), ("merge", True)])
def test_transformers_matches_ctelm(tmp_path, tokenizer, lora, tied):
    elm = make_elm(tokenizer, CFG.replace(tie_word_embeddings=tied), standardised=True)
    out = export_elm(elm, tokenizer, tmp_path / "hf", lora=lora, extra_config={"encoder": "all-MiniLM-L6-v2"})
    config = json.loads((out / "config.json").read_text())
    assert (config["dim_embed_domain"], config["dim_adapter_hidden"], config["encoder"]) == (DOMAIN, HIDDEN,
                                                                                           "all-MiniLM-L6-v2")
    assert (config["placeholder_token"], config["placeholder_token_id"]) == ("<|embedding|>", 49152)
    assert "tokens_per_embedding" not in config  # k = 1: OpenELM's config, as before k existed
    # The placeholder (past the decoder's 49152 rows) gets a zero row in every vocabulary table.
    assert (config["vocab_size"], config["placeholder_row"]) == (49153, True)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["suppress_tokens"] == [49152]
    tensors = read_tensors(out)
    tables = ["model.embed_tokens.weight"] + ([] if tied else ["lm_head.weight"])
    assert sorted(k for k in tensors if k.endswith("embed_tokens.weight") or k.startswith("lm_head")) == sorted(tables)
    for name in tables:
        assert tensors[name].shape == (49153, CFG.hidden_size) and not tensors[name][-1].any()
    assert {k for k in tensors if k.startswith("adapter.")} == {f"adapter.{i}.{w}" for i in (0, 2)
                                                                for w in ("weight", "bias")}
    assert tensors["adapter.0.weight"].shape == (HIDDEN, DOMAIN)
    unmerged = decoder_to_hf(elm.decoder, merge_lora=False)
    q = "model.layers.1.self_attn.q_proj.weight"
    assert (lora == "merge") != np.array_equal(tensors[q], unmerged[q])  # merging changes the weights
    assert (out / "adapter_config.json").is_file() == (lora == "peft")
    loaded = reference.load(out)
    rng = np.random.default_rng(1)

    # Logits on a right-padded batch of two prompts with one and two embeddings.
    tokens, mask = right_padded([encode(tokenizer, p) for p in PROMPTS], tokenizer.pad_id)
    assert (tokens == tokenizer.placeholder_id).sum(axis=1).tolist() == [1, 2]
    embeddings = rng.standard_normal((2, 2, DOMAIN)).astype(np.float32)
    ours, theirs = both_logits(elm, loaded, tokens, mask, embeddings)
    real = mask.astype(bool)
    assert not theirs[..., CFG.vocab_size].any()  # the placeholder's logit: its zero head row gives exactly 0
    theirs = theirs[..., :CFG.vocab_size]
    swapped = np.asarray(elm(jnp.asarray(tokens), jnp.asarray(embeddings[:, ::-1]), segment_ids=jnp.asarray(mask))[0])
    assert np.abs(ours[real] - swapped[real]).max() > 0.1  # the soft tokens reach the logits, in order
    assert np.abs(ours[real] - theirs[real]).max() <= 1e-4

    # Greedy decoding of 32 tokens: the same ids, and the same text through the prompt-level API.
    emb = rng.standard_normal((2, DOMAIN)).astype(np.float32)
    prompt_ids = encode(tokenizer, PROMPTS[1])
    expected = jax_greedy(elm, prompt_ids, emb, 32, tokenizer.eos_ids)
    got = reference.generate_ids(loaded, torch.tensor([prompt_ids]), torch.tensor(emb[None]), 32)[0].tolist()
    assert got == expected and len(expected) == 32
    assert tied or len(set(expected)) > 16  # an untied random decoder does not just repeat itself
    assert reference.generate(loaded, PROMPTS[1], emb, 32) == tokenizer.decode(expected)

    # OpenELM's way (any code that embeds input_ids first): a plain lookup of every id, the placeholder's included,
    # then the adapter's outputs written over the placeholders' rows; generate() as the folder configures it.
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        embeds = loaded.model.get_input_embeddings()(ids)
        embeds[ids == config["placeholder_token_id"]] = loaded.adapter(torch.tensor(emb))
        plain = loaded.model.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(ids), max_new_tokens=32)
    assert plain[0].tolist() == expected
    assert tokenizer.decode(plain[0]) == tokenizer.decode(expected)


def test_k_soft_tokens_round_trip_and_match_transformers(tmp_path):
    """k = 3 soft tokens per embedding (tiny config): config.json carries k, import reads it back, and the PyTorch
    reference splits adapter.2's outputs into k tokens at k placeholders with ctelm_jax's logits and decoding."""
    model_cfg = tiny.get_config().model
    model_cfg.tokens_per_embedding = 3
    tok = load_tokenizer(model_cfg)
    elm = build_elm(model_cfg, tok)
    randomize(elm, seed=4)
    out = export_elm(elm, tok, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["tokens_per_embedding"] == 3
    d_model = model_cfg.arch.hidden_size
    assert read_tensors(out)["adapter.2.weight"].shape == (3 * d_model, model_cfg.adapter_hidden)
    back, back_tok = import_elm(out)
    assert back.tokens_per_embedding == back_tok.tokens_per_embedding == 3
    assert_identical(flat_params(back.adapter), flat_params(elm.adapter))
    assert_identical(decoder_to_hf(back.decoder), decoder_to_hf(elm.decoder, merge_lora=True))
    with pytest.raises(ValueError, match="tokens_per_embedding=3"):
        import_elm(out, tokenizer=Tokenizer(tok.hf, tok.placeholder))

    loaded = reference.load(out)
    ids = [prompts.instruction_prompt(tok, p) for p in PROMPTS]
    tokens, mask = right_padded(ids, tok.pad_id)
    assert (tokens == tok.placeholder_id).sum(axis=1).tolist() == [3, 6]
    rng = np.random.default_rng(5)
    embeddings = rng.standard_normal((2, 2, model_cfg.domain_dim)).astype(np.float32)
    ours, theirs = both_logits(elm, loaded, tokens, mask, embeddings)
    real = mask.astype(bool)
    theirs = theirs[..., :model_cfg.arch.vocab_size]
    swapped = np.asarray(elm(jnp.asarray(tokens), jnp.asarray(embeddings[:, ::-1]), segment_ids=jnp.asarray(mask))[0])
    assert np.abs(ours[real] - swapped[real]).max() > 0.1  # the soft tokens reach the logits, in order
    assert np.abs(ours[real] - theirs[real]).max() <= 1e-4

    # Greedy decoding: ctelm_jax's KV-cache generate, the reference's ids, and its prompt-level API (each
    # placeholder written once, expanded to k there) agree.
    emb = rng.standard_normal((2, model_cfg.domain_dim)).astype(np.float32)
    expected = generate(elm, [ids[1]], [emb], prompts.sampling_config(tok, 12))[0]
    got = reference.generate_ids(loaded, torch.tensor([ids[1]]), torch.tensor(emb[None]), 12)[0].tolist()
    assert got == expected and len(expected) == 12
    assert reference.generate(loaded, PROMPTS[1], emb, 12) == tok.decode(expected)


def test_round_trip_peft_is_bit_identical(tmp_path, elm, tokenizer):
    out = export_elm(elm, tokenizer, tmp_path / "hf", lora="peft", max_shard_bytes=4_000_000)
    assert (out / INDEX_FILE).is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    peft = json.loads((out / "adapter_config.json").read_text())
    assert (peft["peft_type"], peft["r"], peft["lora_alpha"]) == ("LORA", 4, 8.0)
    assert peft["target_modules"] == ["down_proj", "k_proj", "q_proj", "v_proj"]
    back, tok = import_elm(out)
    assert tok.placeholder_id == tokenizer.placeholder_id and len(tok) == len(tokenizer)
    assert tok.chat([{"role": "user", "content": "x"}]) == tokenizer.chat([{"role": "user", "content": "x"}])
    assert_identical(flat_params(back), flat_params(elm))
    loaded = reference.load(out)  # sharded, LoRA merged on the PyTorch side
    assert np.array_equal(loaded.adapter[2].bias.detach().numpy(), np.asarray(elm.adapter.fc_out.bias[...]))
    q = "model.layers.0.self_attn.q_proj.weight"
    np.testing.assert_allclose(loaded.model.state_dict()[q].numpy(), decoder_to_hf(elm.decoder)[q], atol=1e-6)
    scanned, _ = import_elm(out, scan_layers=True)  # stacked layers take the same tensors
    assert_identical(decoder_to_hf(scanned.decoder, merge_lora=False), decoder_to_hf(elm.decoder, merge_lora=False))
    assert_identical(lora_to_peft(scanned.decoder), lora_to_peft(elm.decoder))


def test_round_trip_merged_and_openelm_layout(tmp_path, elm, tokenizer):
    out = export_elm(elm, tokenizer, tmp_path / "hf", lora="merge")
    back, _ = import_elm(out)
    assert back.decoder.config.lora_rank == 0
    assert_identical(decoder_to_hf(back.decoder), decoder_to_hf(elm.decoder, merge_lora=True))
    assert_identical(flat_params(back.adapter), flat_params(elm.adapter))
    # OpenELM's folders carry no placeholder fields; new LoRA factors start at B = 0 on the merged weights.
    config = json.loads((out / "config.json").read_text())
    del config["placeholder_token"], config["placeholder_token_id"]
    (out / "config.json").write_text(json.dumps(config))
    fresh, tok = import_elm(out, lora_rank=2, lora_targets=("q_proj",))
    assert tok.placeholder == "<|embedding|>" and fresh.placeholder_id == tokenizer.placeholder_id
    assert_identical(decoder_to_hf(fresh.decoder), decoder_to_hf(elm.decoder, merge_lora=True))
    assert not np.asarray(fresh.decoder.layers[0].self_attn.q_proj.lora.b[...]).any()


def test_adapter_standardisation_is_folded_into_the_first_linear(tmp_path, tokenizer):
    elm = make_elm(tokenizer, standardised=True)
    assert np.asarray(elm.adapter.input_mean[...]).any()
    back, _ = import_elm(export_elm(elm, tokenizer, tmp_path / "hf", lora="merge"))
    assert not np.asarray(back.adapter.input_mean[...]).any() and (np.asarray(back.adapter.input_scale[...]) == 1).all()
    e = jnp.asarray(np.random.default_rng(2).standard_normal((5, DOMAIN)) * 0.05 + 0.3, jnp.float32)
    np.testing.assert_allclose(np.asarray(back.adapter(e)), np.asarray(elm.adapter(e)), rtol=1e-4, atol=1e-5)


def test_existing_output_is_refused_then_replaced(tmp_path, elm, tokenizer):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_elm(elm, tokenizer, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    export_elm(elm, tokenizer, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    probe = tmp_path / "probe"
    probe.mkdir()  # the mode a plain mkdir gives under this umask
    folder_mode = probe.stat().st_mode & 0o777
    probe.rmdir()
    assert out.stat().st_mode & 0o777 == folder_mode
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {folder_mode & 0o666}  # not safetensors' 0600
    assert siblings(out) == ["hf"]
    (tmp_path / "empty").mkdir()
    export_elm(elm, tokenizer, tmp_path / "empty")  # an empty folder is fine without --overwrite
    assert (tmp_path / "empty" / "config.json").is_file()


def test_failure_mid_write_leaves_nothing_behind(tmp_path, elm, tokenizer, monkeypatch):
    def broken_save(self, path):
        raise OSError("disk full")

    monkeypatch.setattr(Tokenizer, "save", broken_save)  # after the weights and config are written
    with pytest.raises(OSError, match="disk full"):
        export_elm(elm, tokenizer, tmp_path / "new")
    assert siblings(tmp_path / "new") == []
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text("{}")
    with pytest.raises(OSError, match="disk full"):
        export_elm(elm, tokenizer, old, overwrite=True)
    assert siblings(old) == ["old"] and [p.name for p in old.iterdir()] == ["config.json"]


def test_full_disk_stops_the_export_and_keeps_the_previous_one(tmp_path, elm, tokenizer, monkeypatch):
    out = export_elm(elm, tokenizer, tmp_path / "step_8")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(hf, "save_file", full)
    with pytest.raises(UserError, match=rf"exporting to {out} failed: no space left .*{out} is as it was"):
        export_elm(elm, tokenizer, out, overwrite=True)
    assert siblings(out) == ["step_8"] and {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(UserError, match="no space left"):
        export_elm(elm, tokenizer, tmp_path / "step_16")
    assert siblings(tmp_path / "step_16") == ["step_8"]  # no step_16, no temporary folder


def test_bad_folders_raise(tmp_path, elm, tokenizer):
    out = export_elm(elm, tokenizer, tmp_path / "hf", lora="peft", max_shard_bytes=4_000_000)
    broken = tmp_path / "missing_shard"
    shutil.copytree(out, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name}.*missing"):
        import_elm(broken, tokenizer=tokenizer)
    with pytest.raises(FileNotFoundError, match=shard.name):
        reference.load_adapter(broken)
    for name, change, match in [
        ("hidden", {"hidden_size": 32, "head_dim": 8}, r"has shape .* but the config expects"),
        ("adapter", {"dim_adapter_hidden": 40}, r"adapter\.0\.weight.*\(48, 32\).*implies \(40, 32\)"),
        ("plain", {"dim_embed_domain": None}, "not an ELM folder"),
    ]:
        bad = tmp_path / name
        shutil.copytree(out, bad)
        config = {**json.loads((bad / "config.json").read_text()), **change}
        (bad / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
        with pytest.raises(CheckpointError, match=match):
            import_elm(bad, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="adapter vs override"):
        import_elm(out, tokenizer=tokenizer, lora_rank=8)
    os.remove(out / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="adapter_model.safetensors: missing"):
        import_elm(out, tokenizer=tokenizer)
    no_lora = make_elm(tokenizer, CFG.replace(lora_rank=0))
    with pytest.raises(ValueError, match="no LoRA factors"):
        export_elm(no_lora, tokenizer, tmp_path / "x", lora="peft")
    assert not (tmp_path / "x").exists()


def test_pickle_only_elm_folder_is_refused_unread(tmp_path, elm, tokenizer):
    out = export_elm(elm, tokenizer, tmp_path / "hf")
    (out / "model.safetensors").unlink()
    unpickled = pickle_trap(out / "model.pt")
    with pytest.raises(UserError, match=r"pickles \(model\.pt\).*safe_serialization=True"):
        import_elm(out, tokenizer=tokenizer)
    assert not unpickled.exists()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tokenizer):
    """A run directory as training leaves it: resolved config, one orbax checkpoint, concepts, embedding metadata."""
    root = tmp_path_factory.mktemp("run")
    tokenizer.save(root / "tokenizer")
    config = tiny.get_config()
    config.model.tokenizer = str(root / "tokenizer")
    workdir = root / "workdir"
    workdir.mkdir()
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    model = build_elm(config.model, Tokenizer.from_dir(root / "tokenizer"))
    randomize(model, seed=3)
    ckpt = Checkpointer(workdir / "checkpoints", async_save=False)
    ckpt.save(7, {"step": jnp.asarray(7, jnp.int32), "params": nnx.to_pure_dict(nnx.state(model))}, {}, {"step": 7}, {})
    ckpt.close()
    np.savez(workdir / "concepts.npz", age=np.arange(DOMAIN, dtype=np.float32))
    (workdir / "embeddings").mkdir()
    (workdir / "embeddings" / "trials.meta.json").write_text(json.dumps({"encoder": "my-encoder", "dim": DOMAIN}))
    return workdir, model


def test_cli_exports_a_run(tmp_path, run_dir):
    workdir, model = run_dir
    fv = flags.FlagValues()
    export.define_flags(fv)
    fv(["export", f"--checkpoint={workdir}", f"--out={tmp_path / 'hf'}", "--lora=peft", "--max_shard_size=4MB"])
    out = export.run(fv)
    config = json.loads((out / "config.json").read_text())
    assert (config["encoder"], config["ctelm_step"]) == ("my-encoder", 7)
    assert np.array_equal(np.load(out / "concepts.npz")["age"], np.arange(DOMAIN, dtype=np.float32))
    assert json.loads((out / "embeddings" / "trials.meta.json").read_text())["encoder"] == "my-encoder"
    assert (out / INDEX_FILE).is_file()
    assert_identical(flat_params(import_elm(out)[0]), flat_params(model))
    assert export.parse_size("5GB") == 5 * 10**9 and export.parse_size("2MiB") == 2 * 2**20
    with pytest.raises(ValueError, match="expected a number"):
        export.parse_size("5 parsecs")


def test_config_weights_mismatch_raises(tmp_path, run_dir):
    workdir, _ = run_dir
    bad = tmp_path / "bad_run"
    shutil.copytree(workdir, bad)
    config = json.loads((bad / "config.json").read_text())
    config["model"]["adapter_hidden"] = 40
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointMismatch, match=r"adapter/fc_in/\w+ has shape \(64,\) but .* is \(40,\)"):
        export_run(bad, tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and siblings(bad) == ["bad_run"]
    template = {"adapter": {"input_mean": np.zeros(32, np.float32)}, "extra": np.zeros(3, np.float32)}
    with pytest.raises(CheckpointMismatch, match="parameter extra is missing; .* older ctelm_jax"):
        restore_params(workdir / "checkpoints", template)


def test_maybe_export_every_n_steps(tmp_path, run_dir, tokenizer):
    workdir, model = run_dir
    config = tiny.get_config()
    config.export.every_steps = 4
    config.export.dir = str(tmp_path / "exports")
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    assert maybe_export(config, workdir, 3, graphdef, params, tokenizer) is None
    out = maybe_export(config, workdir, 8, graphdef, params, tokenizer)
    assert out == tmp_path / "exports" / "step_8"
    assert json.loads((out / "config.json").read_text())["ctelm_step"] == 8 and (out / "concepts.npz").is_file()
    assert maybe_export(config, workdir, 8, graphdef, params, tokenizer) == out  # a resumed run re-exports in place
    back, _ = import_elm(out)
    assert_identical(decoder_to_hf(back.decoder), decoder_to_hf(model.decoder, merge_lora=True))


def test_reserved_token_is_the_placeholder_and_needs_no_row(tmp_path):
    from tokenizers import Tokenizer as RawTokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<|eot_id|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>", "describe", "trial", "."]
    raw = RawTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="."))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|eot_id|>",
                                     additional_special_tokens=words[1:3])
    hf_tok.chat_template = "{% for m in messages %}{{ m['content'] }} <|eot_id|>{% endfor %}"
    tok = Tokenizer(hf_tok)  # Llama-3's way (OpenELM's too): the reserved token, inside the vocabulary
    assert (tok.placeholder, tok.placeholder_id, len(tok)) == ("<|reserved_special_token_0|>", 1, len(words))
    cfg = CFG.replace(vocab_size=len(words), tie_word_embeddings=True)
    elm = make_elm(tok, cfg)
    out = export_elm(elm, tok, tmp_path / "hf", lora="peft")
    config = json.loads((out / "config.json").read_text())
    assert (config["vocab_size"], config["placeholder_token_id"]) == (len(words), 1) and "placeholder_row" not in config
    assert read_tensors(out)["model.embed_tokens.weight"].shape == (len(words), cfg.hidden_size)
    back, back_tok = import_elm(out)
    assert back_tok.placeholder_id == 1
    assert_identical(flat_params(back), flat_params(elm))
