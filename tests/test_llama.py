"""The NNX Llama decoder against Hugging Face's PyTorch `LlamaForCausalLM` on tiny random models."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from ctelm_jax.generate import greedy_decode
from ctelm_jax.models.llama import Llama, LlamaConfig, init_cache
from ctelm_jax.weights.hf import decoder_from_hf

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def tiny_hf(tied: bool, llama3_rope: bool, seed: int = 0) -> transformers.LlamaForCausalLM:
    """A 2-layer GQA (4 heads / 2 kv) HF Llama with weights large enough to make differences visible."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=tied,
        rope_parameters=LLAMA3_ROPE if llama3_rope else {"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=1, eos_token_id=2,
    )
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    return model


def to_ctelm(hf: transformers.LlamaForCausalLM, **overrides) -> Llama:
    """The same weights in a ctelm_jax `Llama`, config from the HF config dict."""
    cfg = LlamaConfig.from_hf_dict(hf.config.to_dict(), **overrides)
    model = Llama(cfg, rngs=nnx.Rngs(0))
    decoder_from_hf(model, {k: v.detach().numpy() for k, v in hf.state_dict().items()})
    return model


def hf_logits(hf: transformers.LlamaForCausalLM, tokens: np.ndarray) -> np.ndarray:
    """HF fp32 logits (B, T, V)."""
    with torch.no_grad():
        return hf(torch.as_tensor(tokens)).logits.numpy()


TOKENS = np.random.default_rng(0).integers(0, 128, size=(2, 24)).astype(np.int32)


@pytest.mark.parametrize("tied,llama3_rope,scan,remat", [
    (False, False, False, "none"),
    (False, False, True, "none"),
    (True, True, False, "full"),
    (True, True, True, "dots"),
    (False, True, True, "none"),
])
def test_logits_match_hf(tied, llama3_rope, scan, remat):
    hf = tiny_hf(tied, llama3_rope)
    model = to_ctelm(hf, scan_layers=scan, remat_policy=remat)
    assert (model.lm_head is None) == tied
    ours, cache = model(jnp.asarray(TOKENS))
    ref = hf_logits(hf, TOKENS)
    assert cache is None
    assert ours.dtype == jnp.float32 and ours.shape == ref.shape
    assert np.abs(ref).max() > 1.0  # the comparison is not between near-zero logits
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)


def test_llama3_rope_changes_logits():
    """The rope-scaling case exercises scaling: same weights without it give different logits."""
    scaled, plain = tiny_hf(True, True), tiny_hf(True, False)
    assert np.abs(hf_logits(scaled, TOKENS) - hf_logits(plain, TOKENS)).max() > 1e-2


@pytest.mark.parametrize("scan", [False, True])
def test_kv_cache_decode_equals_full_forward(scan):
    model = to_ctelm(tiny_hf(False, True), scan_layers=scan)
    full, _ = model(jnp.asarray(TOKENS))
    call = nnx.jit(lambda m, tokens, cache: m(tokens, cache=cache))
    cache = init_cache(model.config, batch=2, max_len=32)
    prefill = 10
    logits, cache = call(model, jnp.asarray(TOKENS[:, :prefill]), cache)
    steps = [logits]
    for t in range(prefill, TOKENS.shape[1]):
        logits, cache = call(model, jnp.asarray(TOKENS[:, t:t + 1]), cache)
        steps.append(logits)
    assert int(cache["end"]) == TOKENS.shape[1]
    np.testing.assert_allclose(np.concatenate(steps, axis=1), np.asarray(full), atol=1e-5, rtol=0)


def test_greedy_decode_matches_hf_generate():
    hf = tiny_hf(False, False)
    model = to_ctelm(hf)
    prompt = [5, 17, 99, 3, 42, 7]
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                      pad_token_id=0)[0, len(prompt):].tolist()
    assert greedy_decode(model, prompt, 12) == ref
    # Embeddings in place of the prompt's tokens give the same continuation; eos stops it, eos included.
    embeds = model.embed(jnp.asarray([prompt]))
    assert greedy_decode(model, prompt, 12, embeds=embeds) == ref
    assert greedy_decode(model, prompt, 12, eos_ids=(ref[3],)) == ref[:ref.index(ref[3]) + 1]
