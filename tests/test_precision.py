"""Frozen groups stored in bf16 (`train.precision`): which leaves are cast, a train step within bf16 rounding of the
f32 one, checkpoints and exports as before."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, traverse_util

from configs.tiny import get_config
from ctelm_jax.errors import UserError
from ctelm_jax.models.adapter import Adapter
from ctelm_jax.models.elm import ELM
from ctelm_jax.models.llama import Llama, LlamaConfig
from ctelm_jax.run.build import build_elm, load_tokenizer
from ctelm_jax.run.checkpoint import Checkpointer, restore_params
from ctelm_jax.train.optimizer import group_of, make_optimizer, param_labels
from ctelm_jax.train.precision import cast_frozen, frozen_dtype
from ctelm_jax.train.step import TrainState, loss_and_metrics, make_train_step
from ctelm_jax.weights.elm_export import adapter_to_hf
from ctelm_jax.weights.hf import decoder_to_hf, lora_to_peft

VOCAB, PLACEHOLDER, DOMAIN = 256, 255, 24
CFG = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                  lora_rank=4, lora_targets=("q_proj", "k_proj"))
BF16 = {"frozen_dtype": "bfloat16"}
LORA_RUN = [{"trainable": ("adapter",)}, {"trainable": ("adapter", "lora")}]
U_BF16 = 2.0**-8  # bf16 keeps 8 significant bits: round-to-nearest moves a value by at most 2^-8 of itself


def make_model() -> ELM:
    rngs = nnx.Rngs(0)
    decoder = Llama(CFG, rngs=rngs)
    for _, var in nnx.to_flat_state(nnx.state(decoder, nnx.Param)):  # non-zero LoRA B: a LoRA that does something
        if var[...].ndim == 2 and var[...].shape[0] == CFG.lora_rank:
            var[...] = 0.05 * jnp.ones_like(var[...])
    return ELM(decoder, Adapter(DOMAIN, 32, CFG.hidden_size, rngs=rngs), PLACEHOLDER)


def make_batch(b: int = 4, t: int = 32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, VOCAB - 1, (b, t)).astype(np.int32)
    tokens[:, 3] = PLACEHOLDER
    return {"tokens": tokens, "targets": np.roll(tokens, -1, axis=1), "loss_mask": np.ones((b, t), np.float32),
            "segment_ids": np.ones((b, t), np.int32), "positions": np.broadcast_to(np.arange(t), (b, t)).copy(),
            "embeddings": rng.standard_normal((b, 1, DOMAIN)).astype(np.float32),
            "task_ids": np.zeros((b, t), np.int32)}


def dtypes(params) -> dict[tuple, jnp.dtype]:
    return {k: v.dtype for k, v in traverse_util.flatten_dict(params).items()}


def test_lora_run_holds_the_base_in_bf16_and_trained_groups_in_f32(tokenizer):
    config = get_config()
    config.model.frozen_dtype = "bfloat16"
    params = nnx.to_pure_dict(nnx.state(build_elm(config.model, load_tokenizer(config.model))))
    held = dtypes(cast_frozen(params, config.model, config.stages))
    groups = {k: group_of(tuple(str(p) for p in k)) for k in held}
    assert {g for g in groups.values()} == {"decoder", "lora", "adapter", "fixed"}
    for k, dtype in held.items():  # the tiny run trains adapter, then adapter + LoRA: only the base is frozen
        assert dtype == (jnp.bfloat16 if groups[k] == "decoder" else jnp.float32), k
    # A curriculum that trains the decoder in any stage keeps it f32 in every stage (no training from rounded weights).
    full = [{"trainable": ("adapter", "lora")}, {"trainable": ("adapter", "decoder")}]
    assert set(dtypes(cast_frozen(params, config.model, full)).values()) == {jnp.dtype(jnp.float32)}
    # The default keeps everything as it was.
    assert dtypes(cast_frozen(params, get_config().model, config.stages)) == dtypes(params)


def test_unknown_frozen_dtype_is_a_user_error():
    with pytest.raises(UserError, match="model.frozen_dtype='float16'"):
        frozen_dtype({"frozen_dtype": "float16"})


def test_train_step_with_bf16_base_is_within_bf16_rounding_of_f32():
    graphdef, state = nnx.split(make_model())
    params = nnx.to_pure_dict(state)
    low = cast_frozen(params, BF16, LORA_RUN)
    batch = make_batch()
    labels = param_labels(params, ("adapter", "lora"))
    tx = make_optimizer(labels, optax.constant_schedule(1e-2))
    state16, metrics = jax.jit(make_train_step(graphdef, labels, tx, 1))(
        TrainState(step=jnp.zeros((), jnp.int32), params=low, opt_state=tx.init(low)), batch)
    loss16 = float(metrics["loss"])
    f32_loss_and_grads = jax.jit(jax.value_and_grad(lambda p: loss_and_metrics(nnx.merge(graphdef, p), batch, 1)[0]))
    loss32, grads = f32_loss_and_grads(params)
    loss_rounded, _ = f32_loss_and_grads(jax.tree.map(lambda x: x.astype(jnp.float32), low))

    # Compute stays f32: the bf16 step is the f32 loss of the rounded weights (to f32 rounding of a 128-token mean).
    assert loss16 == pytest.approx(float(loss_rounded), rel=128 * 2**-24, abs=0)
    # Against unrounded f32: each frozen weight w moves by at most U|w|, so to first order the loss moves by at most
    # U * sum |dL/dw| |w| over the frozen weights; twice that leaves room for the second-order term.
    flat_g, flat_w = traverse_util.flatten_dict(grads), traverse_util.flatten_dict(params)
    frozen = [k for k in flat_w if group_of(tuple(str(p) for p in k)) == "decoder"]
    bound = 2 * U_BF16 * sum(float(jnp.sum(jnp.abs(flat_g[k] * flat_w[k]))) for k in frozen)
    assert 0 < abs(loss16 - float(loss32)) <= bound, (loss16, float(loss32), bound)

    # After the step: trained leaves moved and are still f32 masters; frozen leaves are the same bf16 arrays.
    before, after = traverse_util.flatten_dict(low), traverse_util.flatten_dict(state16.params)
    for k, v in before.items():
        assert after[k].dtype == v.dtype, k
        group = group_of(tuple(str(p) for p in k))
        if group == "decoder":
            assert after[k].dtype == jnp.bfloat16 and np.array_equal(np.asarray(after[k]), np.asarray(v)), k
        elif group in ("adapter", "lora"):
            assert after[k].dtype == jnp.float32 and not np.array_equal(np.asarray(after[k]), np.asarray(v)), k


def test_export_writes_param_dtype_tensors_as_before():
    graphdef, state = nnx.split(make_model())
    params = nnx.to_pure_dict(state)
    low = nnx.merge(graphdef, cast_frozen(params, BF16, LORA_RUN))
    # "Before": the f32 model holding the same (rounded) values exports these tensors.
    same = nnx.merge(graphdef, jax.tree.map(lambda x: x.astype(jnp.float32), cast_frozen(params, BF16, LORA_RUN)))
    for merge in (True, False):  # LoRA merged into the kernel in f32, not into a bf16 kernel
        a, b = decoder_to_hf(low.decoder, merge_lora=merge), decoder_to_hf(same.decoder, merge_lora=merge)
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == np.float32 and np.array_equal(a[k], b[k]), k
    for a, b in ((lora_to_peft(low.decoder), lora_to_peft(same.decoder)),
                 (adapter_to_hf(low.adapter, np.float32), adapter_to_hf(same.adapter))):
        assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


def test_checkpoint_restores_bf16_as_saved_and_f32_for_decoding(tmp_path):
    params = cast_frozen(nnx.to_pure_dict(nnx.state(make_model())), BF16, LORA_RUN)
    ckpt = Checkpointer(tmp_path / "checkpoints", async_save=False)
    ckpt.save(1, {"step": np.int32(1), "params": params}, {}, {"step": 1}, {})
    ckpt.close()
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    for target_dtype in (None, jnp.float32):  # a resume's template (as trained) / decode's (param_dtype, float32)
        template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, target_dtype or x.dtype, sharding=device),
                                params)
        restored, _ = restore_params(tmp_path / "checkpoints", template)
        for k, v in traverse_util.flatten_dict(params).items():
            got = traverse_util.flatten_dict(restored)[k]
            assert got.dtype == (target_dtype or v.dtype)
            assert np.array_equal(np.asarray(got, np.float32), np.asarray(v, np.float32)), k
