"""Batched KV-cache decoding against full recomputation; sampling, repetition penalty and top-p against HF."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers.generation.logits_process import (NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor,
                                                    TopPLogitsWarper)

from ctelm_jax import generate as gen
from ctelm_jax.generate import (SamplingConfig, apply_repetition_penalty, generate, repeated_ngram_bans,
                                top_p_filter)
from ctelm_jax.models.adapter import Adapter
from ctelm_jax.models.elm import ELM
from ctelm_jax.models.llama import Llama, LlamaConfig

VOCAB, PLACEHOLDER, DOMAIN = 96, 96, 12  # the placeholder lies past the vocabulary, as with the real tokenizer
CFG = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  lora_rank=2, max_position_embeddings=128)


def tiny_elm(seed: int = 0) -> ELM:
    """A random ELM with weights large enough that logits are far from ties."""
    rngs = nnx.Rngs(seed)
    model = ELM(Llama(CFG, rngs=rngs), Adapter(DOMAIN, 16, CFG.hidden_size, rngs=rngs), PLACEHOLDER)
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        shape = var[...].shape
        scale = 0.1 if "norm" in str(path) else 0.3
        base = 1.0 if "norm" in str(path) else 0.0
        var[...] = jnp.asarray(base + scale * rng.standard_normal(shape), jnp.float32)
    return model


PROMPTS = [[5, PLACEHOLDER, 9, 11], [3, 4, PLACEHOLDER, 7, PLACEHOLDER, 8, 1, 2, 60], [17, 18, 19], [PLACEHOLDER, 40]]
N_EMB = [1, 2, 0, 1]


def embeddings(seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((n, DOMAIN)).astype(np.float32) for n in N_EMB]


@nnx.jit
def _full_forward(model: ELM, tokens: jax.Array, emb: jax.Array) -> jax.Array:
    return model(tokens, emb)[0]


def reference(model: ELM, prompt: list[int], emb: np.ndarray, n: int, penalty: float = 1.0) -> list[int]:
    """Greedy decoding by recomputing the full, unpadded forward pass for every new token.

    The sequence sits at the start of a fixed 32-slot buffer (one compile); causal attention makes the logits at
    its last token independent of the unused slots after it.
    """
    tokens = list(prompt)
    e = jnp.asarray(emb if emb.shape[0] else np.zeros((1, DOMAIN), np.float32))[None]
    for _ in range(n):
        buffer = np.zeros((1, 32), np.int32)
        buffer[0, : len(tokens)] = tokens
        logits = np.asarray(_full_forward(model, jnp.asarray(buffer), e)[0, len(tokens) - 1])
        seen = np.zeros(VOCAB, bool)
        seen[[t for t in tokens if t < VOCAB]] = True
        logits = np.where(seen, np.where(logits < 0, logits * penalty, logits / penalty), logits)
        tokens.append(int(np.argmax(logits)))
    return tokens[len(prompt):]


@pytest.fixture(scope="module")
def model():
    return tiny_elm()


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_batched_kv_decode_equals_full_recompute(model, penalty):
    embs = embeddings()
    cfg = SamplingConfig(max_new_tokens=10, batch_size=4, repetition_penalty=penalty)
    ours = generate(model, PROMPTS, embs, cfg)
    ref = [reference(model, p, e, 10, penalty) for p, e in zip(PROMPTS, embs)]
    assert ours == ref
    # Same answers one prompt at a time, and in batches of 3 (one dummy row of padding in the second bucket).
    assert [generate(model, [p], [e], cfg)[0] for p, e in zip(PROMPTS, embs)] == ref
    assert generate(model, PROMPTS, embs, SamplingConfig(max_new_tokens=10, batch_size=3,
                                                         repetition_penalty=penalty)) == ref


def test_stop_ids_and_budget(model):
    embs = embeddings()
    free = generate(model, PROMPTS, embs, SamplingConfig(max_new_tokens=10))
    stop = free[1][4]
    stopped = generate(model, PROMPTS, embs, SamplingConfig(max_new_tokens=10, stop_ids=(stop,)))
    for f, s in zip(free, stopped):
        assert s == (f[: f.index(stop) + 1] if stop in f else f)
    assert all(len(o) == 3 for o in generate(model, PROMPTS, embs, SamplingConfig(max_new_tokens=3)))


def test_banned_ids_are_never_generated(model):
    embs = embeddings()
    free = generate(model, PROMPTS, embs, SamplingConfig(max_new_tokens=8))
    banned = tuple(sorted({t for o in free for t in o}))[:3]
    out = generate(model, PROMPTS, embs, SamplingConfig(max_new_tokens=8, banned_ids=banned))
    assert not {t for o in out for t in o} & set(banned)


def test_one_compile_per_bucket(model):
    cfg = SamplingConfig(max_new_tokens=4, batch_size=4)
    generate(model, PROMPTS, embeddings(), cfg)
    before = gen.decode_batch._cache_size()
    generate(model, [p[:-1] for p in PROMPTS[:1]] + PROMPTS[1:], embeddings(), cfg)  # same buckets
    assert gen.decode_batch._cache_size() == before


def test_sampling_is_deterministic_given_rng(model):
    cfg = SamplingConfig(max_new_tokens=12, temperature=1.5, top_p=0.9, repetition_penalty=1.2)
    a = generate(model, PROMPTS, embeddings(), cfg, jax.random.key(7))
    b = generate(model, PROMPTS, embeddings(), cfg, jax.random.key(7))
    c = generate(model, PROMPTS, embeddings(), cfg, jax.random.key(8))
    assert a == b
    assert a != c


def test_repetition_penalty_matches_hf():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 50)).astype(np.float32) * 3
    ids = rng.integers(0, 50, (3, 7))
    ref = RepetitionPenaltyLogitsProcessor(1.2)(torch.as_tensor(ids), torch.as_tensor(logits.copy())).numpy()
    seen = np.zeros((3, 50), bool)
    np.put_along_axis(seen, ids, True, axis=1)
    ours = np.asarray(apply_repetition_penalty(jnp.asarray(logits), jnp.asarray(seen), 1.2))
    np.testing.assert_allclose(ours, ref, rtol=1e-6)
    assert (ours != logits).any()


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram_bans_match_hf(n):
    rng = np.random.default_rng(n)
    out = rng.integers(0, 6, (4, 12))  # a small vocabulary, so n-grams repeat
    for i in range(12):
        ref = NoRepeatNGramLogitsProcessor(n)(torch.as_tensor(out[:, :i]), torch.zeros(4, 6)).numpy()
        ours = np.asarray(repeated_ngram_bans(jnp.asarray(out), jnp.asarray(i), n, 6))
        np.testing.assert_array_equal(ours, np.isinf(ref), err_msg=f"step {i}")


def test_no_repeat_ngram_decoding_never_repeats(model):
    cfg = SamplingConfig(max_new_tokens=24, no_repeat_ngram_size=2, batch_size=4)
    for row in generate(model, PROMPTS, embeddings(), cfg):
        bigrams = list(zip(row, row[1:]))
        assert len(bigrams) == len(set(bigrams)) and len(row) == 24


def test_top_p_keeps_the_right_set():
    probs = np.array([[0.05, 0.5, 0.15, 0.3]], np.float32)
    logits = jnp.log(jnp.asarray(probs))
    kept = lambda p: set(np.flatnonzero(np.isfinite(np.asarray(top_p_filter(logits, p)))[0]).tolist())  # noqa: E731
    assert kept(0.4) == {1}
    assert kept(0.75) == {1, 3}
    assert kept(0.9) == {1, 2, 3}
    assert kept(1.0) == {0, 1, 2, 3}
    rng = np.random.default_rng(1)
    random_logits = rng.standard_normal((4, 64)).astype(np.float32) * 2
    for p in (0.3, 0.7, 0.95):
        ref = TopPLogitsWarper(p)(None, torch.as_tensor(random_logits.copy())).numpy()
        ours = np.asarray(top_p_filter(jnp.asarray(random_logits), p))
        np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref))


@pytest.mark.parametrize("prompts,embs,match", [
    ([[5, PLACEHOLDER]], [np.zeros((2, DOMAIN), np.float32)], r"1 placeholder tokens \(id 96\) but 2 embeddings"),
    ([[5, PLACEHOLDER]], [np.zeros((1, DOMAIN + 1), np.float32)], r"takes \(n, 12\)"),
    ([[5, PLACEHOLDER]], [np.full((1, DOMAIN), np.nan, np.float32)], "NaN"),
    ([[]], [np.zeros((0, DOMAIN), np.float32)], "empty"),
    ([[5, PLACEHOLDER]], [], "1 prompts but 0 embedding sets"),
    ([[5] * 125], [np.zeros((0, DOMAIN), np.float32)], "max_position_embeddings"),
])
def test_bad_inputs_raise(model, prompts, embs, match):
    with pytest.raises(ValueError, match=match):
        generate(model, prompts, embs, SamplingConfig(max_new_tokens=4))


def test_bad_config_raises():
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-1.0)
