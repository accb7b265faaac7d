"""Loading at scale: parameters created in their shards, decoder weights read per shard, runs restored onto a mesh."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from configs.tiny import get_config
from ctelm_jax import prompts
from ctelm_jax.generate import SamplingConfig, generate
from ctelm_jax.models.adapter import Adapter
from ctelm_jax.models.elm import ELM
from ctelm_jax.models.embed_head import EmbedHead
from ctelm_jax.models.llama import Llama, LlamaConfig
from ctelm_jax.parallel.mesh import make_mesh
from ctelm_jax.parallel.rules import DEFAULT_RULES, logical_to_spec
from ctelm_jax.run.build import build_elm
from ctelm_jax.run.checkpoint import Checkpointer
from ctelm_jax.run.trained import load_trained, run_mesh
from ctelm_jax.weights import hf

MESH_2X2X2 = {"data": 2, "fsdp": 2, "tensor": 2}


def flat(model: nnx.Module) -> dict:
    """{path: array} of every variable of a module."""
    return {path: var.get_value() for path, var in nnx.to_flat_state(nnx.state(model))}


def expected_sharding(var: nnx.Variable, mesh) -> NamedSharding:
    """The sharding the logical rules give a variable on `mesh`."""
    return NamedSharding(mesh, logical_to_spec(var.get_metadata()["out_sharding"], DEFAULT_RULES, mesh))


def placed_as(array: jax.Array, sharding: NamedSharding) -> bool:
    """Whether `array` is laid out on the devices as `sharding` says."""
    return array.sharding.is_equivalent_to(sharding, array.ndim)


def test_fresh_parameters_are_created_in_their_shards(tokenizer):
    config = get_config()
    mesh = make_mesh(MESH_2X2X2)
    # No host array is put on a device, explicitly or not: every parameter comes out of the jitted initialiser.
    with jax.transfer_guard_host_to_device("disallow_explicit"):
        model = build_elm(config.model, tokenizer, mesh=mesh)
    reference = flat(build_elm(config.model, tokenizer))  # the same seed on one device
    sharded = 0
    for path, var in nnx.to_flat_state(nnx.state(model)):
        array, want = var.get_value(), expected_sharding(var, mesh)
        assert placed_as(array, want), path
        assert all(s.data.shape == want.shard_shape(array.shape) for s in array.addressable_shards), path
        np.testing.assert_array_equal(np.asarray(array), np.asarray(reference[path]), err_msg=str(path))
        sharded += not want.is_fully_replicated
    assert sharded > len(reference) // 2  # the rules shard most parameters on this mesh


def pretrained_folder(path, scan_layers: bool) -> LlamaConfig:
    """A random decoder saved as a sharded HF folder with the real tokenizer's vocabulary; returns its config."""
    cfg = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                      num_kv_heads=2, scan_layers=scan_layers)
    hf.write_tensors(hf.decoder_to_hf(Llama(cfg, rngs=nnx.Rngs(7))), path, max_shard_bytes=2_000_000)
    (path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    assert (path / hf.INDEX_FILE).is_file()
    return cfg


@pytest.mark.parametrize("scan_layers", [False, True])
def test_sharded_read_of_a_sharded_folder_equals_the_full_read(tmp_path, tokenizer, monkeypatch, scan_layers):
    cfg = pretrained_folder(tmp_path, scan_layers)
    config = get_config()
    config.model.decoder, config.model.arch = str(tmp_path), {}
    config.model.scan_layers = scan_layers
    reads = []
    original = hf.SafetensorsFolder.read

    def recorded(self, name, index):
        block = original(self, name, index)
        reads.append((name, block.shape))
        return block

    monkeypatch.setattr(hf.SafetensorsFolder, "read", recorded)
    mesh = make_mesh(MESH_2X2X2)
    model = build_elm(config.model, tokenizer, mesh=mesh)

    # The old path: an eagerly built model, every tensor read on the host into it, a fresh adapter and embedding
    # head (same seed, same order).
    m = config.model
    rngs = nnx.Rngs(m.seed)
    full = Llama(cfg.replace(lora_rank=m.lora_rank, lora_alpha=m.lora_alpha, lora_targets=tuple(m.lora_targets)),
                 rngs=rngs)
    hf.decoder_from_hf(full, hf.read_tensors(tmp_path))
    adapter = Adapter(m.domain_dim, m.adapter_hidden, cfg.hidden_size, rngs=rngs)
    head = EmbedHead(cfg.hidden_size, m.domain_dim, m.embed_pred_weight, rngs=rngs)
    reference = flat(ELM(full, adapter, tokenizer.placeholder_id, head))
    got = nnx.to_flat_state(nnx.state(model))
    assert {p for p, _ in got} == set(reference)
    for path, var in got:
        assert placed_as(var.get_value(), expected_sharding(var, mesh)), path
        np.testing.assert_array_equal(np.asarray(var.get_value()), np.asarray(reference[path]), err_msg=str(path))

    # Each read is one device's block of one tensor, read once for its replicas: q_proj (out 32, in 32) is split
    # over tensor (out) and fsdp (in) into 4 blocks of (16, 16), each read once although 8 devices hold them.
    q = [shape for name, shape in reads if name == "model.layers.0.self_attn.q_proj.weight"]
    assert q == [(16, 16)] * 4
    largest = max(int(np.prod(shape)) for shape in hf.SafetensorsFolder(tmp_path).shapes.values())
    assert max(int(np.prod(shape)) for _, shape in reads) == largest // 4  # embed_tokens: vocab/2 x hidden/2


@pytest.fixture(scope="module")
def run(tmp_path_factory, tokenizer):
    """A tiny run directory whose checkpoint holds weights large enough that greedy decoding is far from ties."""
    workdir = tmp_path_factory.mktemp("run")
    config = get_config()
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    model = build_elm(config.model, tokenizer)
    rng = np.random.default_rng(0)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        norm = "norm" in str(path)
        var[...] = jnp.asarray(float(norm) + (0.1 if norm else 0.3) * rng.standard_normal(var.shape), var.dtype)
    ckpt = Checkpointer(workdir / "checkpoints", async_save=False)
    ckpt.save(5, {"step": np.int32(5), "params": nnx.to_pure_dict(nnx.state(model))}, {}, {"step": 5}, {})
    ckpt.close()
    return workdir


def test_decoding_on_a_mesh_equals_one_device(run, tokenizer):
    rng = np.random.default_rng(1)
    vectors = [v[None] for v in rng.standard_normal((6, 32)).astype(np.float32)]
    jobs = [prompts.describe_prompt(tokenizer)] * 4 + [prompts.attribute_prompt(tokenizer, "phase")] * 2
    sampling = SamplingConfig(max_new_tokens=8, batch_size=4, pad_id=0)
    tokens = {}
    for name, mesh in (("one device", make_mesh({}, jax.devices()[:1])), ("2x2x2", make_mesh(MESH_2X2X2))):
        model, _, _, step = load_trained(run, mesh=mesh)
        assert step == 5
        for path, var in nnx.to_flat_state(nnx.state(model)):
            assert placed_as(var.get_value(), expected_sharding(var, mesh)), (name, path)
        tokens[name] = generate(model, jobs, vectors, sampling)
    assert all(len(t) == 8 for t in tokens["one device"])
    assert tokens["2x2x2"] == tokens["one device"]


def test_a_run_loads_onto_every_local_device_by_default(run):
    model = load_trained(run).model
    # configs/tiny.py asks for mesh data=-1: all 8 devices hold every (replicated) parameter.
    assert all(len(a.sharding.device_set) == len(jax.local_devices()) == 8 for a in jax.tree.leaves(nnx.state(model)))


def test_run_mesh_keeps_the_runs_layout_when_it_fits_else_fsdp():
    config = get_config()
    config.mesh.update(data=2, fsdp=-1, tensor=1)
    assert dict(run_mesh(config).shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    config.mesh.update(data=2, fsdp=8, tensor=1)  # 16 devices: trained on two hosts, loaded on one
    assert dict(run_mesh(config).shape) == {"data": 1, "fsdp": 8, "tensor": 1}
