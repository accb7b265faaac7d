"""Decoding that checks itself (vec2text's idea): decode n candidate texts per input vector, re-embed them with the
frozen encoder and keep the one closest to the vector.

Candidate 0 is the text of the given decoding settings (greedy in the evaluation and by default in `decode`); the
other n - 1 are sampled (temperature, top-p) from a fixed seed, all inputs repeated in one batched decode. Every
candidate is re-embedded in one call of `encode`. Since candidate 0 is among them and a tie keeps the earliest, the
chosen text never re-embeds farther from its vector than candidate 0.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import numpy as np

from ctelm_jax import prompts
from ctelm_jax.generate import SamplingConfig
from ctelm_jax.models.elm import ELM
from ctelm_jax.vectors import cosine_rows
from ctelm_jax.weights.tokenizer import Tokenizer

Encode = Callable[[Sequence[str]], np.ndarray]  # texts -> (m, d) unit vectors of the frozen encoder


@dataclasses.dataclass(frozen=True)
class RerankConfig:
    """How many candidates per input and how the sampled ones (all but candidate 0) are drawn."""

    candidates: int = 4
    temperature: float = 0.7
    # 1: no nucleus filter. Below 1, `generate.top_p_filter` sorts the whole vocabulary at every step: for 32 rows of
    # SmolLM2's 49,152 tokens about 0.85 s a step on 2 shared CPU cores, ten times the sampling draw itself (0.09 s).
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        # Each message starts with the field as `field=value: `, which `decode` turns into its flag's name.
        if self.candidates < 2:
            raise ValueError(f"candidates={self.candidates}: re-ranking needs at least 2, e.g. 4.")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature}: sampled candidates need a positive temperature, "
                             "e.g. 0.7.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p}: it must lie in (0, 1] (1: off), e.g. 0.95.")


@dataclasses.dataclass(frozen=True)
class Reranked:
    """Per input, every candidate's text (candidate 0: the given settings' decode) and its re-embed cosine."""

    candidates: list[list[str]]  # (N, n)
    cosines: np.ndarray  # (N, n) cosine of each candidate's re-embedding to its input vector

    @property
    def chosen(self) -> np.ndarray:
        """Index of the kept candidate per input (N,): the highest cosine, the earliest on a tie."""
        return np.argmax(self.cosines, axis=1)

    @property
    def texts(self) -> list[str]:
        """The kept text per input."""
        return [c[i] for c, i in zip(self.candidates, self.chosen)]

    @property
    def chosen_cosines(self) -> np.ndarray:
        """The kept text's cosine per input (N,)."""
        return self.cosines[np.arange(len(self.cosines)), self.chosen]


def input_vectors(embeddings: Sequence[np.ndarray]) -> np.ndarray:
    """The one vector each input describes, (N, d); a ValueError for a prompt of another number of embeddings."""
    out = []
    for i, e in enumerate(embeddings):
        e = np.asarray(e, np.float32)
        e = e[None] if e.ndim == 1 else e
        if e.ndim != 2 or e.shape[0] != 1:
            raise ValueError(f"input {i}: re-ranking compares a text with the one embedding it describes; got "
                             f"embeddings of shape {e.shape}.")
        out.append(e[0])
    return np.stack(out)


def rerank(model: ELM, tokenizer: Tokenizer, prompt_ids: Sequence[list[int]], embeddings: Sequence[np.ndarray],
           config: SamplingConfig, encode: Encode, options: RerankConfig = RerankConfig(),
           rng: jax.Array | int | None = None, first: Sequence[str] | None = None) -> Reranked:
    """Decodes `options.candidates` texts per prompt (one embedding each), re-embeds them and keeps the closest.

    Candidate 0 is decoded with `config` and `rng` (or taken from `first`, those texts already decoded); the others
    are sampled with `config` at `options.temperature` / `options.top_p` from `options.seed`."""
    if len(embeddings) == 0:
        return Reranked([], np.zeros((0, options.candidates)))
    vectors = input_vectors(embeddings)
    if first is None:
        first = prompts.decode_texts(model, tokenizer, prompt_ids, embeddings, config, rng)
    if len(first) != len(vectors):
        raise ValueError(f"{len(first)} first candidates for {len(vectors)} inputs.")
    k = options.candidates - 1
    sampling = dataclasses.replace(config, temperature=options.temperature, top_p=options.top_p)
    sampled = prompts.decode_texts(model, tokenizer, [p for p in prompt_ids for _ in range(k)],
                                   [v[None] for v in vectors for _ in range(k)], sampling, options.seed)
    candidates = [[first[i], *sampled[i * k:(i + 1) * k]] for i in range(len(vectors))]
    encoded = np.asarray(encode([t for c in candidates for t in c]))
    cosines = cosine_rows(encoded, np.repeat(vectors, options.candidates, axis=0))
    return Reranked(candidates, cosines.reshape(len(vectors), options.candidates))
