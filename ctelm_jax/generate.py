"""Batched KV-cache decoding for the ELM (and the bare Llama decoder): greedy or sampled, one compile per shape bucket.

Prompts are sorted by length, grouped into batches and left-padded to a bucket length (a multiple of 16 up to 128
tokens, a power of two beyond); batches are padded to a power-of-two row count with dummy rows. Padding has segment
id 0 (attends to nothing real), positions count real tokens only, so a padded row decodes exactly as it would alone.
The whole decode loop is one `jax.lax.while_loop` on device (no host round trip per token) that stops once every row
has produced a stop token or `max_new_tokens`. Logits are processed as Hugging Face `generate` does, in this order:
repetition penalty (over prompt + generated tokens), no-repeat n-grams (over generated tokens, as `generate` given
input embeddings), banned tokens, temperature, top-p; temperature 0 is greedy (argmax after the penalty).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ctelm_jax.models.elm import ELM
from ctelm_jax.models.llama import Llama, init_cache

LENGTH_STEP, POW2_FROM = 16, 128  # prompt lengths round up to a multiple of 16 up to 128, to a power of two beyond


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to decode: budget, sampling, stopping and batching (hashable: part of the compile key)."""

    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # 1: no nucleus filtering
    repetition_penalty: float = 1.0  # 1: off; OpenELM uses 1.2 (HF semantics)
    no_repeat_ngram_size: int = 0  # n > 0: never repeat an n-gram of the generated tokens (HF semantics); 0: off
    stop_ids: tuple[int, ...] = ()  # a row stops after the first of these (it is included in the output)
    banned_ids: tuple[int, ...] = ()  # never generated (e.g. the embedding placeholder if it is in the vocabulary)
    batch_size: int = 16
    pad_id: int = 0

    def __post_init__(self):
        object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))
        object.__setattr__(self, "banned_ids", tuple(int(i) for i in self.banned_ids))
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}; it must be at least 1.")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}; use 0 for greedy or a positive value to sample.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p}; it must lie in (0, 1].")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty}; it must be positive (1 = off).")
        if self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size={self.no_repeat_ngram_size}; use 0 (off) or a positive n.")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size}; it must be positive.")

    @property
    def greedy(self) -> bool:
        """Whether decoding takes the argmax (temperature 0)."""
        return self.temperature == 0.0


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
    """HF's `RepetitionPenaltyLogitsProcessor`: seen tokens' logits divided by `penalty` if > 0, else multiplied."""
    penalised = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalised, logits)


def top_p_filter(logits: jax.Array, top_p: float) -> jax.Array:
    """HF's `TopPLogitsWarper`: -inf outside the smallest set of top tokens whose probability reaches `top_p`."""
    order = jnp.argsort(logits, axis=-1)  # ascending
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    remove_sorted = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1) <= 1.0 - top_p
    remove_sorted = remove_sorted.at[..., -1].set(False)
    rows = jnp.arange(logits.shape[0])[:, None]
    remove = jnp.zeros_like(remove_sorted).at[rows, order].set(remove_sorted)
    return jnp.where(remove, -jnp.inf, logits)


def repeated_ngram_bans(out: jax.Array, i: jax.Array, n: int, vocab_size: int) -> jax.Array:
    """HF's `NoRepeatNGramLogitsProcessor` over generated tokens out[:, :i] (B, N): (B, V) True for each token that
    would complete an n-gram already among them (the last n - 1 tokens followed by it)."""
    b, length = out.shape
    starts = length - n + 1  # n-gram start positions in the buffer
    if starts < 1:
        return jnp.zeros((b, vocab_size), bool)
    last = jax.lax.dynamic_slice_in_dim(out, jnp.maximum(i - n + 1, 0), n - 1, axis=1) if n > 1 else out[:, :0]
    match = jnp.arange(starts)[None, :] + n - 1 < i  # the n-gram lies wholly inside the generated tokens
    for o in range(n - 1):
        match &= out[:, o:o + starts] == last[:, o:o + 1]
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, starts))
    bans = jnp.zeros((b, vocab_size), bool).at[rows, out[:, n - 1:]].max(match, mode="drop")
    return bans & (i >= n - 1)


def next_tokens(logits: jax.Array, seen: jax.Array | None, key: jax.Array, cfg: SamplingConfig,
                bans: jax.Array | None = None) -> jax.Array:
    """The next token (B,) from last-position logits (B, V), the tokens seen so far (B, V) bool (None without a
    repetition penalty) and tokens banned for this step (B, V) bool (None: none)."""
    if cfg.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
    if bans is not None:
        logits = jnp.where(bans, -jnp.inf, logits)
    banned = [i for i in cfg.banned_ids if i < logits.shape[-1]]
    if banned:
        logits = logits.at[:, jnp.asarray(banned)].set(-jnp.inf)
    if cfg.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / cfg.temperature
    if cfg.top_p < 1.0:
        logits = top_p_filter(logits, cfg.top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _mark(seen: jax.Array | None, tokens: jax.Array, real: jax.Array) -> jax.Array | None:
    """`seen` (B, V) with tokens (B, T) where `real` marked; ids past the vocabulary (the placeholder) are dropped.
    None (no repetition penalty: nothing to track) stays None."""
    if seen is None:
        return None
    rows = jnp.arange(seen.shape[0])[:, None]
    counts = jnp.zeros(seen.shape, jnp.int32).at[rows, tokens].add(real.astype(jnp.int32), mode="drop")
    return seen | (counts > 0)


def _decode_loop(
    decoder: Llama, x: jax.Array, tokens: jax.Array, segment_ids: jax.Array, done: jax.Array, key: jax.Array,
    cfg: SamplingConfig,
) -> tuple[jax.Array, jax.Array]:
    """Prefills left-padded inputs x (B, T, D) and decodes on device; (new tokens (B, N), how many are valid (B,))."""
    b, t, _ = x.shape
    n = cfg.max_new_tokens
    dcfg = decoder.config
    real = segment_ids > 0
    lengths = real.sum(axis=1).astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(real, axis=1) - 1, 0).astype(jnp.int32)
    cache = init_cache(dcfg, b, t + n, jnp.dtype(dcfg.dtype))
    logits, cache = decoder(embeds=x, positions=positions, segment_ids=segment_ids, cache=cache, last_only=True)
    seen = None if cfg.repetition_penalty == 1.0 else _mark(jnp.zeros((b, dcfg.vocab_size), bool), tokens, real)
    stop = jnp.asarray(cfg.stop_ids or (-1,), jnp.int32)

    def emit(i, token, done, out, count, seen):
        token = jnp.where(done, cfg.pad_id, token)
        out = jax.lax.dynamic_update_slice(out, token[:, None], (0, i))
        count = count + (~done).astype(jnp.int32)
        seen = _mark(seen, token[:, None], ~done[:, None])
        done = done | jnp.isin(token, stop)
        return out, count, seen, done

    key, sub = jax.random.split(key)
    first = next_tokens(logits[:, -1], seen, sub, cfg)
    out = jnp.full((b, n), cfg.pad_id, jnp.int32)
    out, count, seen, done = emit(0, first, done, out, jnp.zeros((b,), jnp.int32), seen)

    def cond(carry):
        i, _, done, *_ = carry
        return (i < n) & ~jnp.all(done)

    def body(carry):
        i, cache, done, out, count, seen, key = carry
        prev = jax.lax.dynamic_slice_in_dim(out, i - 1, 1, axis=1)
        logits, cache = decoder(embeds=decoder.embed(prev), positions=(lengths + i - 1)[:, None],
                                segment_ids=jnp.ones((b, 1), jnp.int32), cache=cache)
        key, sub = jax.random.split(key)
        bans = (repeated_ngram_bans(out, i, cfg.no_repeat_ngram_size, logits.shape[-1])
                if cfg.no_repeat_ngram_size else None)
        token = next_tokens(logits[:, -1], seen, sub, cfg, bans)
        out, count, seen, done = emit(i, token, done, out, count, seen)
        return i + 1, cache, done, out, count, seen, key

    carry = (jnp.ones((), jnp.int32), cache, done, out, count, seen, key)
    _, _, _, out, count, _, _ = jax.lax.while_loop(cond, body, carry)
    return out, count


@partial(jax.jit, static_argnums=(0, 1))
def decode_batch(graphdef: nnx.GraphDef, cfg: SamplingConfig, state: nnx.State, tokens: jax.Array,
                 segment_ids: jax.Array, embeddings: jax.Array, done: jax.Array, key: jax.Array):
    """One padded batch through the ELM: soft tokens spliced at placeholders, then the decode loop."""
    model = nnx.merge(graphdef, state)
    x = model.input_embeddings(tokens, embeddings)
    return _decode_loop(model.decoder, x, tokens, segment_ids, done, key, cfg)


@partial(jax.jit, static_argnums=(0, 1))
def _generate_llama(graphdef: nnx.GraphDef, cfg: SamplingConfig, state: nnx.State, tokens: jax.Array,
                    embeds: jax.Array | None, key: jax.Array):
    """One unpadded batch through the bare decoder (token embeddings, or the given input embeddings)."""
    decoder = nnx.merge(graphdef, state)
    x = decoder.embed(tokens) if embeds is None else embeds.astype(jnp.dtype(decoder.config.dtype))
    b, t = tokens.shape
    return _decode_loop(decoder, x, tokens, jnp.ones((b, t), jnp.int32), jnp.zeros((b,), bool), key, cfg)


def _pow2(n: int) -> int:
    """The smallest power of two >= n."""
    b = 1
    while b < n:
        b *= 2
    return b


def length_bucket(n: int) -> int:
    """The padded prompt length for a longest prompt of n tokens (few buckets, little padding on short prompts)."""
    return -(-n // LENGTH_STEP) * LENGTH_STEP if n <= POW2_FROM else _pow2(n)


def _as_key(rng: jax.Array | int | None) -> jax.Array:
    """A PRNG key from a key, a seed or None (seed 0)."""
    if rng is None or isinstance(rng, (int, np.integer)):
        return jax.random.key(int(rng or 0))
    return rng


def check_inputs(model: ELM, prompts: Sequence[Sequence[int]], embeddings: Sequence[np.ndarray],
                 max_new_tokens: int) -> list[np.ndarray]:
    """Validates prompts against their embeddings; float32 (n_i, d) arrays, or ValueError naming the problem."""
    if len(prompts) != len(embeddings):
        raise ValueError(f"{len(prompts)} prompts but {len(embeddings)} embedding sets; give one (n_i, d) array "
                         "per prompt (n_i = its placeholder count / tokens_per_embedding, may be 0).")
    d = model.adapter.domain_dim
    limit = model.decoder.config.max_position_embeddings
    out = []
    for i, (p, e) in enumerate(zip(prompts, embeddings)):
        e = np.asarray(e, np.float32)
        if e.ndim == 1:
            e = e[None]
        if e.ndim != 2 or (e.size and e.shape[1] != d):
            raise ValueError(f"prompt {i}: embeddings have shape {e.shape}; the model's adapter takes (n, {d}).")
        if not np.isfinite(e).all():
            raise ValueError(f"prompt {i}: embeddings contain NaN or inf.")
        if not len(p):
            raise ValueError(f"prompt {i} is empty.")
        slots, k = sum(1 for tok in p if tok == model.placeholder_id), model.tokens_per_embedding
        if slots != k * e.shape[0]:
            raise ValueError(f"prompt {i} has {slots} placeholder tokens (id {model.placeholder_id}) but "
                             f"{e.shape[0]} embeddings; each embedding takes {k} placeholder(s), in order.")
        if len(p) + max_new_tokens > limit:
            raise ValueError(f"prompt {i}: {len(p)} tokens + max_new_tokens={max_new_tokens} exceed the decoder's "
                             f"max_position_embeddings={limit}.")
        out.append(e.reshape(e.shape[0], d))
    return out


def generate(model: ELM, prompts: Sequence[Sequence[int]], embeddings: Sequence[np.ndarray],
             config: SamplingConfig, rng: jax.Array | int | None = None) -> list[list[int]]:
    """New token ids per prompt (up to and including the first stop id); embeddings[i] (n_i, d) fill prompt i's
    placeholders in order, `model.tokens_per_embedding` each. Same inputs, config and rng give the same outputs."""
    embeddings = check_inputs(model, prompts, embeddings, config.max_new_tokens)
    if not prompts:
        return []
    key = _as_key(rng)
    graphdef, state = nnx.split(model)
    # Weights stay where they are (a loaded run's lie sharded on its mesh); host arrays go up once, not every batch.
    state = jax.device_put(state)
    d = model.adapter.domain_dim
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[list[int]] = [[] for _ in prompts]
    for batch_index, start in enumerate(range(0, len(order), config.batch_size)):
        rows = order[start:start + config.batch_size]
        b = _pow2(len(rows))
        t = length_bucket(max(len(prompts[i]) for i in rows))
        e = _pow2(max(max(embeddings[i].shape[0] for i in rows), 1))
        tokens = np.full((b, t), config.pad_id, np.int32)
        segments = np.zeros((b, t), np.int32)
        emb = np.zeros((b, e, d), np.float32)
        done = np.ones((b,), bool)
        tokens[:, -1], segments[:, -1] = config.pad_id, 1  # dummy rows: one real token, done from the start
        for j, i in enumerate(rows):
            p = prompts[i]
            tokens[j, t - len(p):] = p
            segments[j, t - len(p):] = 1
            emb[j, : embeddings[i].shape[0]] = embeddings[i]
            done[j] = False
        out, count = decode_batch(graphdef, config, state, tokens, segments, emb, done,
                                  jax.random.fold_in(key, batch_index))
        out, count = np.asarray(out), np.asarray(count)
        for j, i in enumerate(rows):
            results[i] = out[j, : count[j]].tolist()
    return results


def greedy_decode(
    model: Llama, prompt_ids: Sequence[int], max_new_tokens: int, eos_ids: Sequence[int] = (),
    embeds: jax.Array | np.ndarray | None = None,
) -> list[int]:
    """Greedy continuation of one prompt by the bare decoder: the new ids, up to and including the first of `eos_ids`.

    `embeds` (T, hidden) or (1, T, hidden), if given, replaces the prompt's input embeddings (soft tokens);
    `prompt_ids` still sets the prompt length.
    """
    if not prompt_ids or max_new_tokens <= 0:
        return []
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, stop_ids=tuple(eos_ids), batch_size=1)
    tokens = jnp.asarray([list(prompt_ids)], jnp.int32)
    if embeds is not None:
        embeds = jnp.asarray(embeds).reshape(1, len(prompt_ids), model.config.hidden_size)
    graphdef, state = nnx.split(model)
    out, count = _generate_llama(graphdef, cfg, state, tokens, embeds, jax.random.key(0))
    return np.asarray(out)[0, : int(count[0])].tolist()
