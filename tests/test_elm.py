"""The ELM's splice with k soft tokens per embedding: each embedding's k adapter outputs at its k placeholders."""

import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from ctelm_jax import prompts
from ctelm_jax.generate import check_inputs
from ctelm_jax.run.build import build_elm, load_tokenizer

K = 3


@pytest.fixture(scope="module")
def model_and_tokenizer():
    model_cfg = tiny.get_config().model
    model_cfg.tokens_per_embedding = K
    tokenizer = load_tokenizer(model_cfg)
    return build_elm(model_cfg, tokenizer), tokenizer


def test_k_soft_tokens_land_at_k_placeholders_in_order(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    assert tokenizer.slot == tokenizer.placeholder * K and model.tokens_per_embedding == K
    prompt = prompts.instruction_prompt(tokenizer, "Compare the trial {E} with the trial {E}.")
    assert prompts.slots(tokenizer, prompt) == 2
    tokens = jnp.asarray([prompt], jnp.int32)
    where = np.flatnonzero(np.asarray(prompt) == tokenizer.placeholder_id)
    # two runs of K consecutive placeholders, text between them
    assert len(where) == 2 * K and (np.diff(where[:K]) == 1).all() and (np.diff(where[K:]) == 1).all()
    assert where[K] - where[K - 1] > 1
    embeddings = jnp.asarray(np.random.default_rng(0).standard_normal((1, 2, model.adapter.domain_dim)), jnp.float32)
    soft = np.asarray(model.adapter(embeddings))
    assert soft.shape == (1, 2, K, model.decoder.config.hidden_size)
    assert np.abs(soft[0, 0, 0] - soft[0, 0, 1]).max() > 1e-3  # k different tokens, not one copied
    spliced = np.asarray(model.input_embeddings(tokens, embeddings))[0]
    # placeholder n holds token n % K of embedding n // K, exactly (the same adapter call)
    np.testing.assert_array_equal(spliced[where], soft[0].reshape(2 * K, -1))
    rest = np.asarray(prompt) != tokenizer.placeholder_id
    np.testing.assert_array_equal(spliced[rest], np.asarray(model.decoder.embed(tokens))[0][rest])


def test_prompts_and_inputs_count_embeddings_not_placeholders(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    # the placeholder written once per trial is one embedding's slot, as {E} is
    marked = prompts.instruction_prompt(tokenizer, "Compare {E} with {E}.")
    written = prompts.instruction_prompt(tokenizer, f"Compare {tokenizer.placeholder} with {tokenizer.placeholder}.")
    assert marked == written
    d = model.adapter.domain_dim
    assert len(check_inputs(model, [marked], [np.ones((2, d), np.float32)], 4)[0]) == 2
    with pytest.raises(ValueError, match=rf"{2 * K} placeholder tokens .* but 1 embeddings; each embedding takes {K}"):
        check_inputs(model, [marked], [np.ones((1, d), np.float32)], 4)
