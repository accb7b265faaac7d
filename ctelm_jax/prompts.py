"""Decoding prompts, token for token the training prompts of `data.tasks` (first instruction variant of each task),
and text decoding with the settings every answer needs (stop at the end of turn, never emit the placeholder).

`data.tasks` keeps its instruction templates private; the few names used here are read in this one place.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from ctelm_jax.data import tasks
from ctelm_jax.generate import SamplingConfig, generate
from ctelm_jax.models.elm import ELM
from ctelm_jax.weights.tokenizer import Tokenizer

MARKER = "{E}"  # the placeholder marker of `data.tasks` instruction templates; users may write it too


def instruction_prompt(tokenizer: Tokenizer, instruction: str) -> list[int]:
    """The chat prompt of an instruction whose embeddings are each marked by "{E}" or one placeholder token (each
    written out as the k placeholders of `Tokenizer.slot`)."""
    text = instruction.replace(tokenizer.placeholder, MARKER)
    if MARKER not in text:
        raise ValueError(f"the question {instruction!r} has no embedding slot; write {MARKER} or "
                         f"{tokenizer.placeholder} where the trial goes, e.g. 'What phase is the trial {MARKER}?'")
    return tasks.encode_prompt(tokenizer, text.replace(MARKER, tokenizer.slot))


def describe_prompt(tokenizer: Tokenizer) -> list[int]:
    """The `describe` prompt (one embedding)."""
    return instruction_prompt(tokenizer, tasks._DESCRIBE[0])


def attribute_prompt(tokenizer: Tokenizer, attribute: str) -> list[int]:
    """The `attributes` question about `attribute` (one of `tasks.ATTRIBUTES`; one embedding)."""
    if attribute not in tasks.ATTRIBUTES:
        raise ValueError(f"unknown attribute {attribute!r}; known: {tasks.ATTRIBUTES}")
    return instruction_prompt(tokenizer, tasks._QUESTIONS[attribute][0])


def compare_prompt(tokenizer: Tokenizer) -> list[int]:
    """The `compare` prompt (two embeddings)."""
    return instruction_prompt(tokenizer, tasks._COMPARE[0])


def revise_prompt(tokenizer: Tokenizer, draft: str) -> list[int]:
    """The `revise` prompt around a draft text (two embeddings: the draft's, then the target's)."""
    instruction = tasks.revise_instruction(draft.replace(tokenizer.placeholder, " "))
    return tasks.encode_prompt(tokenizer, instruction.replace(MARKER, tokenizer.slot))


def slots(tokenizer: Tokenizer, prompt: list[int]) -> int:
    """How many embeddings `prompt` takes (k placeholders each)."""
    return sum(1 for t in prompt if t == tokenizer.placeholder_id) // tokenizer.tokens_per_embedding


def stop_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    """Ids that end an answer: the template's end of turn and the tokenizer's end tokens."""
    return tuple(sorted({tasks.end_of_turn_id(tokenizer), *tokenizer.eos_ids}))


def sampling_config(tokenizer: Tokenizer, max_new_tokens: int, batch_size: int = 16, temperature: float = 0.0,
                    top_p: float = 1.0, repetition_penalty: float = 1.0,
                    no_repeat_ngram_size: int = 0) -> SamplingConfig:
    """Decoding settings for this tokenizer: stop at the end of the answer, never emit the placeholder."""
    return SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                          repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                          stop_ids=stop_ids(tokenizer),
                          banned_ids=(tokenizer.placeholder_id,), batch_size=batch_size, pad_id=tokenizer.pad_id)


def decode_texts(model: ELM, tokenizer: Tokenizer, prompts: Sequence[list[int]], embeddings: Sequence[np.ndarray],
                 config: SamplingConfig, rng: jax.Array | int | None = None) -> list[str]:
    """The decoded answer text of each prompt (special tokens dropped, outer whitespace stripped)."""
    return [tokenizer.decode(ids).strip() for ids in generate(model, prompts, embeddings, config, rng)]
