"""Decoding that corrects itself round after round (vec2text's correction, retrieve-and-edit's drafts): the `revise`
task reads a draft trial (its embedding and key lines) and the target embedding and writes the target trial.

Round 0 is the draft: the nearest corpus trial to the target vector (`neighbour`), or the model's own greedy
`describe` text (`greedy`), with its encoder embedding. Each round re-embeds the last text with the run's encoder
and revises it toward the target. The output is the round (1..R) whose text re-embeds closest to the target (the
earliest on a tie); the draft is a candidate only with `keep_draft`, so by default a score above the neighbour's is
the model's, not retrieval's.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from ctelm_jax import prompts
from ctelm_jax.errors import UserError
from ctelm_jax.generate import SamplingConfig
from ctelm_jax.models.elm import ELM
from ctelm_jax.rerank import Encode
from ctelm_jax.vectors import cosine_rows
from ctelm_jax.weights.tokenizer import Tokenizer

DRAFTS = ("none", "neighbour", "greedy")
MAX_ROUNDS = 8


def check_rounds(rounds: int, draft: str) -> None:
    """A UserError naming the flag for a round count or draft kind decoding cannot take."""
    if draft not in DRAFTS:
        raise UserError(f"--draft={draft!r}: choose one of {', '.join(DRAFTS)}.")
    if not 0 <= rounds <= MAX_ROUNDS:
        raise UserError(f"--rounds={rounds}: pass 0 to {MAX_ROUNDS} revision rounds (each re-embeds and rewrites "
                        "every text once), e.g. --rounds=2.")
    if draft != "none" and rounds == 0:
        raise UserError(f"--draft={draft} with --rounds=0 revises nothing; pass --rounds=1 or more, or --draft=none.")


@dataclasses.dataclass(frozen=True)
class Revised:
    """Per target: the draft and every round's text, with their re-embed cosines to the target."""

    drafts: list[str]  # (N,)
    draft_cosines: np.ndarray  # (N,)
    rounds: list[list[str]]  # (R, N)
    cosines: np.ndarray  # (R, N)
    keep_draft: bool = False

    @property
    def chosen(self) -> np.ndarray:
        """The kept round per target, 1..R (0: the draft, only with keep_draft): the closest, the earliest on a tie."""
        table = np.concatenate([self.draft_cosines[None], self.cosines]) if self.keep_draft else self.cosines
        return np.argmax(table, axis=0) + (0 if self.keep_draft else 1)

    @property
    def texts(self) -> list[str]:
        """The kept text per target."""
        every = [self.drafts, *self.rounds]
        return [every[r][i] for i, r in enumerate(self.chosen)]

    @property
    def chosen_cosines(self) -> np.ndarray:
        """The kept text's cosine per target."""
        every = np.concatenate([self.draft_cosines[None], self.cosines])
        return every[self.chosen, np.arange(every.shape[1])]

    @property
    def equal_to_draft(self) -> float:
        """Share of kept texts identical to their draft (a model that only copies scores 1)."""
        return float(np.mean([t.strip() == d.strip() for t, d in zip(self.texts, self.drafts)])) if self.drafts \
            else 0.0


def revise(model: ELM, tokenizer: Tokenizer, targets: np.ndarray, drafts: Sequence[str], draft_vectors: np.ndarray,
           config: SamplingConfig, encode: Encode, rounds: int, keep_draft: bool = False) -> Revised:
    """`rounds` revisions of each draft (text, encoder embedding) toward its target vector (N, d), batched over the
    targets; every round's text is re-embedded with `encode` (the run's encoder)."""
    targets = np.asarray(targets, np.float32)
    if len(drafts) != len(targets) or np.shape(draft_vectors) != targets.shape:
        raise ValueError(f"{len(drafts)} drafts with vectors of shape {np.shape(draft_vectors)} for targets of shape "
                         f"{targets.shape}; give one draft per target.")
    if rounds < 1:
        raise ValueError(f"rounds={rounds}: revision needs at least one round.")
    texts, vectors = list(drafts), np.asarray(draft_vectors, np.float32)
    all_texts, all_cosines = [], []
    for _ in range(rounds):
        prompt_ids = [prompts.revise_prompt(tokenizer, t) for t in texts]
        texts = prompts.decode_texts(model, tokenizer, prompt_ids, [np.stack([v, t]) for v, t in zip(vectors, targets)],
                                     config)
        vectors = np.asarray(encode(texts), np.float32)
        all_texts.append(texts)
        all_cosines.append(cosine_rows(vectors, targets))
    return Revised(list(drafts), cosine_rows(np.asarray(draft_vectors), targets), all_texts, np.stack(all_cosines),
                   keep_draft)
