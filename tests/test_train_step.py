"""The sharded train step: same loss and gradients on every mesh; frozen parameters stay put and hold no state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, traverse_util

from ctelm_jax.models.adapter import Adapter
from ctelm_jax.models.elm import ELM
from ctelm_jax.models.llama import Llama, LlamaConfig, no_constraint
from ctelm_jax.parallel.mesh import make_mesh
from ctelm_jax.parallel.rules import DEFAULT_RULES, batch_sharding, constrainer, state_shardings
from ctelm_jax.train.optimizer import make_optimizer, param_labels, partition
from ctelm_jax.train.step import TrainState, loss_and_metrics, make_train_step

VOCAB, PLACEHOLDER, DOMAIN = 256, 255, 24
CFG = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                  lora_rank=4, lora_targets=("q_proj", "k_proj", "down_proj"))


def make_model(constrain=no_constraint, cfg=CFG) -> ELM:
    rngs = nnx.Rngs(0)
    decoder = Llama(cfg, rngs=rngs, constrain=constrain)
    # Non-zero LoRA B so LoRA gradients reach A too.
    for _, var in nnx.to_flat_state(nnx.state(decoder, nnx.Param)):
        if var[...].ndim == 2 and var[...].shape[0] == cfg.lora_rank:
            var[...] = 0.01 * jnp.ones_like(var[...])
    return ELM(decoder, Adapter(DOMAIN, 32, cfg.hidden_size, rngs=rngs), PLACEHOLDER)


def make_batch(b: int = 8, t: int = 32, e: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB - 1, (b, t)).astype(np.int32)
    tokens[:, 3] = PLACEHOLDER
    tokens[: b // 2, 9] = PLACEHOLDER
    segment_ids = np.ones((b, t), np.int32)
    segment_ids[:, 20:] = 2
    segment_ids[:, 28:] = 0
    positions = np.where(np.arange(t) < 20, np.arange(t), np.arange(t) - 20).astype(np.int32)
    return {
        "tokens": tokens, "targets": np.roll(tokens, -1, axis=1),
        "loss_mask": (rng.random((b, t)) < 0.6).astype(np.float32) * (segment_ids > 0),
        "segment_ids": segment_ids, "positions": np.broadcast_to(positions, (b, t)).copy(),
        "embeddings": rng.standard_normal((b, e, DOMAIN)).astype(np.float32),
        "task_ids": rng.integers(0, 3, (b, t)).astype(np.int32),
    }


def loss_and_grads(mesh_shape):
    """Loss and gradients w.r.t. all parameters, computed on the given (data, fsdp, tensor) mesh (None: 1 device)."""
    batch = make_batch()
    if mesh_shape is None:
        model = make_model()
        graphdef, state = nnx.split(model)
        params = nnx.to_pure_dict(state)
        place = lambda b: b  # noqa: E731
        fn = jax.jit
    else:
        mesh = make_mesh(dict(zip(("data", "fsdp", "tensor"), mesh_shape)))
        model = make_model(constrainer(mesh, DEFAULT_RULES))
        graphdef, state = nnx.split(model)
        shardings = nnx.to_pure_dict(state_shardings(state, mesh, DEFAULT_RULES))
        params = jax.device_put(nnx.to_pure_dict(state), shardings)
        place = lambda b: {k: jax.device_put(v, batch_sharding(mesh, DEFAULT_RULES, v.ndim)) for k, v in b.items()}  # noqa: E731
        fn = lambda f: jax.jit(f, in_shardings=(shardings, None))  # noqa: E731

    def loss(p, b):
        return loss_and_metrics(nnx.merge(graphdef, p), b, 3)[0]

    value, grads = fn(jax.value_and_grad(loss))(params, place(batch))
    return float(value), traverse_util.flatten_dict(jax.device_get(grads))


@pytest.fixture(scope="module")
def reference():
    return loss_and_grads(None)


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_step_matches_single_device(reference, mesh_shape):
    assert jax.device_count() == 8
    ref_loss, ref_grads = reference
    loss, grads = loss_and_grads(mesh_shape)
    # The loss is a mean of 8 x 32 positive f32 token terms (~10.8 each) that each mesh sums in its own order; any
    # order's rounding error is below (n - 1) * 2^-24 of the sum (measured: 1-2 ulp, 9.5e-7 apart).
    assert loss == pytest.approx(ref_loss, rel=8 * 32 * 2**-24, abs=0)
    # Gradients: measured at most 9e-8 apart, ~1e-6 of the largest gradient element (0.09); the bound is 100x that.
    assert set(grads) == set(ref_grads)
    for k in ref_grads:
        np.testing.assert_allclose(grads[k], ref_grads[k], atol=1e-5, rtol=0, err_msg=str(k))
    # LoRA A factors must receive a gradient (B was set non-zero), so the comparison is not vacuous.
    lora_a = [k for k in ref_grads if k[-1] == "a"]
    assert lora_a and all(np.abs(ref_grads[k]).max() > 0 for k in lora_a)


def run_steps(trainable, steps=3):
    model = make_model()
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    labels = param_labels(params, trainable)
    tx = make_optimizer(labels, optax.constant_schedule(1e-2))
    ts = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    step = jax.jit(make_train_step(graphdef, labels, tx, 3))
    for i in range(steps):
        ts, metrics = step(ts, make_batch(seed=i))
        assert np.isfinite(metrics["loss"])
    return params, ts, labels


def _changed(before, after):
    fb, fa = traverse_util.flatten_dict(before), traverse_util.flatten_dict(jax.device_get(after))
    return {k for k in fb if not np.array_equal(np.asarray(fb[k]), np.asarray(fa[k]))}


def test_adapter_only_stage_freezes_decoder():
    before, ts, labels = run_steps(("adapter",))
    changed = _changed(before, ts.params)
    assert changed and all(k[0] == "adapter" for k in changed)
    fixed = {("adapter", "input_mean"), ("adapter", "input_scale")}  # statistics, never trained
    assert {k for k in traverse_util.flatten_dict(before) if k[0] == "adapter"} - fixed == changed
    # No optimizer state for frozen leaves: the Adam moments hold exactly the adapter's scalars, twice.
    train, _ = partition(before, labels)
    adapter_scalars = sum(v.size for v in train.values())
    moment_scalars = sum(x.size for x in jax.tree.leaves(ts.opt_state) if getattr(x, "ndim", 0) > 0)
    assert moment_scalars == 2 * adapter_scalars


def test_lora_stage_changes_only_adapter_and_lora():
    before, ts, _ = run_steps(("adapter", "lora"))
    changed = _changed(before, ts.params)
    assert any("lora" in k for k in changed) and any(k[0] == "adapter" for k in changed)
    assert all(k[0] == "adapter" or "lora" in k for k in changed)


def test_unknown_group_and_empty_selection_are_rejected():
    params = nnx.to_pure_dict(nnx.split(make_model(cfg=CFG.replace(lora_rank=0)))[1])
    with pytest.raises(ValueError, match="unknown trainable groups"):
        param_labels(params, ("adaptor",))
    with pytest.raises(ValueError, match="selects no parameter"):
        param_labels(params, ("lora",))
