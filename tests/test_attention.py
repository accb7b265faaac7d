"""Attention implementations (`models.attention`): the heads-major xla path equals `jax.nn.dot_product_attention` (its
previous body) and the splash kernel (Pallas interpret mode on CPU) equals the xla path, with packed segments and
padding, forward and gradients, on one device and per shard of a mesh; packed examples are isolated in the ELM's
training forward on every implementation; "auto" picks xla on CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax.sharding import NamedSharding, PartitionSpec

from configs import tiny
from ctelm_jax.models.attention import attend, choose, platform, splash_block, splash_length, visible
from ctelm_jax.parallel.mesh import make_mesh
from ctelm_jax.parallel.rules import DEFAULT_RULES, constrainer
from ctelm_jax.run.build import abstract_elm, build_elm, load_tokenizer

B, T, N, D = 4, 256, 4, 16  # T = 2 splash tiles of 128: the kernel's cross-tile online softmax and block skipping run
EPS = float(np.finfo(np.float32).eps)


def packed_segments(b: int, t: int) -> np.ndarray:
    """Rows of 1-3 packed examples whose boundaries fall inside and across the kernel's tiles, then padding (0)."""
    seg = np.zeros((b, t), np.int32)
    seg[0, :100], seg[0, 100:200] = 1, 2        # two examples, 56 padding tokens
    seg[1, :] = 1                               # one full row
    seg[2, :40], seg[2, 40:130], seg[2, 130:250] = 1, 2, 3
    seg[3, :128] = 1                            # one example, a whole tile of padding
    return seg


def qkv(kv_heads: int, seed: int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal((B, T, N, D)), jnp.float32),
            jnp.asarray(rng.standard_normal((B, T, kv_heads, D)), jnp.float32),
            jnp.asarray(rng.standard_normal((B, T, kv_heads, D)), jnp.float32))


@pytest.mark.parametrize("mesh_sizes, kv_heads", [
    (None, 2),                              # one device, grouped-query heads (2 queries per kv head)
    ({"data": 4, "tensor": 2}, 2),          # per shard: rows over data, query and kv heads over tensor
    ({"data": 4, "tensor": 2}, 1),          # one kv head for 2 head shards: copies of it per shard
])
def test_splash_equals_xla_forward_and_gradients(mesh_sizes, kv_heads):
    """Splash output and the gradients of a weighted sum of it w.r.t. q, k, v equal the xla path's.

    Both compute in f32 with different orders (the kernel's tiled online softmax; XLA's whole-row softmax): each
    output or gradient element is a sum of at most T products whose rounding differs by O(T eps) of the largest
    term, so the tolerance is T * eps times the largest |reference| value (T eps = 3e-5). Masked keys contribute
    exact zeros on both sides, so a boundary in the wrong place would differ by O(1)."""
    constrain = None if mesh_sizes is None else constrainer(make_mesh(mesh_sizes), DEFAULT_RULES)
    q, k, v = qkv(kv_heads)
    seg = jnp.asarray(packed_segments(B, T))
    weights = jnp.asarray(np.random.default_rng(1).standard_normal((B, T, N, D)), jnp.float32)

    def loss(impl):
        def f(q, k, v):
            out = attend(q, k, v, seg, seg, implementation=impl, constrain=constrain)
            return (out * weights).sum(), out
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))

    (_, out), grads = loss("splash")(q, k, v)
    (_, ref), ref_grads = loss("xla")(q, k, v)
    for name, got, want in [("out", out, ref), *zip(("dq", "dk", "dv"), grads, ref_grads)]:
        tol = T * EPS * float(jnp.abs(want).max())
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=tol, err_msg=name)


@pytest.mark.parametrize("mesh_sizes", [None, {"data": 4, "tensor": 2}])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("start", [None, 7])
def test_xla_equals_jax_nn_dot_product_attention_forward_and_gradients(mesh_sizes, kv_heads, start):
    """The heads-major xla path (grouped query heads stacked as rows) computes what `jax.nn.dot_product_attention`
    with the same (B, 1, T, S) mask computes, output and gradients w.r.t. q, k, v, for plain multi-head, grouped and
    multi-query heads, in self-attention over packed rows and over a KV cache (5 new tokens written at slot 7 of 16,
    empty slots segment 0), on one device and with the inputs sharded over the 8-device mesh (rows over data, heads
    over tensor where they divide). Both take the same products in f32 in different layouts: each element is a sum
    of at most S products whose rounding may differ by O(S eps) of the largest term, hence S * eps * max|reference|."""
    rng = np.random.default_rng(3)
    if start is None:
        q, k, v = qkv(kv_heads)
        q_seg = kv_seg = jnp.asarray(packed_segments(B, T))
    else:
        t, s = 5, 16
        q = jnp.asarray(rng.standard_normal((B, t, N, D)), jnp.float32)
        k, v = (jnp.asarray(rng.standard_normal((B, s, kv_heads, D)), jnp.float32) for _ in range(2))
        kv_np = np.zeros((B, s), np.int32)
        kv_np[:, :start + t] = 1
        kv_np[0, :3] = 0  # a row whose prompt was left-padded
        kv_seg, q_seg = jnp.asarray(kv_np), jnp.asarray(kv_np[:, start:start + t])
    if mesh_sizes is not None:
        mesh = make_mesh(mesh_sizes)
        heads = lambda n: "tensor" if n % mesh_sizes["tensor"] == 0 else None  # noqa: E731
        q = jax.device_put(q, NamedSharding(mesh, PartitionSpec("data", None, heads(N))))
        k, v = (jax.device_put(x, NamedSharding(mesh, PartitionSpec("data", None, heads(kv_heads)))) for x in (k, v))
    weights = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    mask = visible(q_seg, kv_seg, 0 if start is None else start)[:, None]

    def grads(f):
        def loss(q, k, v):
            out = f(q, k, v)
            return (out * weights).sum(), out
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))

    (_, out), got = grads(lambda q, k, v: attend(q, k, v, q_seg, kv_seg, start=start, implementation="xla"))(q, k, v)
    (_, ref), want = grads(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask))(q, k, v)
    tol_len = k.shape[1] * EPS
    for name, a, b in [("out", out, ref), *zip(("dq", "dk", "dv"), got, want)]:
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=tol_len * float(jnp.abs(b).max()),
                                   err_msg=name)


def test_splash_tiles():
    """The kernel runs at the length rounded up to 128 (TPU lanes), tiled by the largest of 512 / 256 / 128 dividing
    that."""
    lengths = (2048, 512, 384, 256, 128, 64, 192, 520)
    assert [splash_length(t) for t in lengths] == [2048, 512, 384, 256, 128, 128, 256, 640]
    assert [splash_block(t) for t in lengths] == [512, 512, 128, 256, 128, 128, 256, 128]


@pytest.fixture(scope="module")
def tiny_model():
    config = tiny.get_config()
    tokenizer = load_tokenizer(config.model)
    return config, tokenizer, build_elm(config.model, tokenizer)


@pytest.mark.parametrize("implementation", ["xla", "splash"])
def test_packed_examples_do_not_see_each_other(tiny_model, implementation):
    """The training forward (as `train.step.token_losses` calls the ELM) on rows packing three examples (each with a
    soft token) and padding, 120 tokens (splash pads them to 128 of its own): changing the tokens of the middle example changes its logits and leaves the other
    examples' and the padding's exactly as they were (what they may see is identical; what they may not gets
    softmax weight exactly 0)."""
    config, tokenizer, model = tiny_model
    config = config.copy_and_resolve_references()
    config.model.attention = implementation
    graphdef, state = nnx.graphdef(abstract_elm(config.model, tokenizer)), nnx.state(model)  # same weights
    b, t, e = 2, 120, 3
    rng = np.random.default_rng(0)
    bounds = [(0, 40), (40, 90), (90, 112)]  # 8 padding tokens after
    segment_ids = np.zeros((b, t), np.int32)
    positions = np.zeros((b, t), np.int32)
    tokens = rng.integers(10, 1000, (b, t)).astype(np.int32)
    for s, (lo, hi) in enumerate(bounds):
        segment_ids[:, lo:hi], positions[:, lo:hi] = s + 1, np.arange(hi - lo)
        tokens[:, lo + 2] = tokenizer.placeholder_id
    embeddings = rng.standard_normal((b, e, config.model.domain_dim)).astype(np.float32)

    @jax.jit
    def logits(state, tokens):
        model = nnx.merge(graphdef, state)
        return model(tokens, embeddings, positions=positions, segment_ids=segment_ids)[0]

    changed = tokens.copy()
    lo, hi = bounds[1]
    changed[:, lo:hi] = np.where(changed[:, lo:hi] == tokenizer.placeholder_id, changed[:, lo:hi],
                                 rng.integers(1000, 2000, (b, hi - lo)))
    before, after = np.asarray(logits(state, tokens)), np.asarray(logits(state, changed))
    middle = segment_ids == 2
    np.testing.assert_array_equal(after[~middle], before[~middle])
    assert np.abs(after[middle] - before[middle]).max() > 1e-2


def test_auto_is_xla_on_cpu_splash_on_tpu_cudnn_on_gpu_in_16_bits():
    mesh = make_mesh({"data": -1})
    assert platform() == platform(constrainer(mesh, DEFAULT_RULES)) == "cpu"
    assert choose("auto", platform(), jnp.float32) == choose("auto", "cpu", jnp.bfloat16) == "xla"
    assert choose("auto", "tpu", jnp.float32) == "splash"
    assert choose("auto", "gpu", jnp.bfloat16) == "cudnn"
    assert choose("auto", "gpu", jnp.float32) == "xla"  # cuDNN's fused attention takes 16-bit inputs only
    assert choose("splash", "cpu", jnp.float32) == "splash"  # named: as asked (off TPU: interpret mode)
