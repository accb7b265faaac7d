"""Decode throughput of ctelm_jax's `generate` against Hugging Face `generate` on the same model and soft-token prompts.

    .venv/bin/python bench/decode.py [--batch_sizes=1,16] [--new_tokens=128] [--reps=5]

Model: the default ELM at initialisation (the pretrained SmolLM2-135M-Instruct decoder, as converted into
`weights.default.default_decoder_dir()`, plus a fresh adapter); throughput does not depend on the weights. Prompts:
the `describe` prompt with one soft token, from random unit embeddings. The same input embeddings (the adapter's soft
token spliced in by ctelm_jax) go to `LlamaForCausalLM.generate(inputs_embeds=...)`. Both decode greedily in float32
and are forced to produce exactly `new_tokens` (no stop ids for ctelm_jax, `min_new_tokens` for HF). Time to first
token = a 1-token generate (prefill + first sample). With --int8 (default) ctelm_jax with weight-only int8
(`models.quantize`) is timed too, and its greedy tokens compared with float32's. Runs alternate, after one untimed
warm-up each (ctelm_jax compiles then); medians over `reps`.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from absl import app, flags
from transformers import LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # configs/ lives at the repo root
from configs.default import get_config  # noqa: E402
from ctelm_jax import prompts  # noqa: E402
from ctelm_jax.generate import SamplingConfig, generate  # noqa: E402
from ctelm_jax.models.quantize import quantize_elm  # noqa: E402
from ctelm_jax.run.build import build_elm, decoder_dir, load_tokenizer  # noqa: E402

_BATCHES = flags.DEFINE_list("batch_sizes", ["1", "16"], "Batch sizes to time.")
_NEW = flags.DEFINE_integer("new_tokens", 128, "New tokens per sequence.")
_REPS = flags.DEFINE_integer("reps", 5, "Timed repetitions per framework and setting.")
_INT8 = flags.DEFINE_bool("int8", True, "Also time ctelm_jax with weight-only int8 (`--quantize=int8`).")


def _time(fn) -> float:
    """Wall seconds of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: Sequence[str]) -> None:
    """Builds both models, checks they agree, times batch sizes x (throughput, first token), prints medians."""
    del argv
    config = get_config()
    tokenizer = load_tokenizer(config.model)
    model = build_elm(config.model, tokenizer)
    int8 = quantize_elm(model)
    hf = LlamaForCausalLM.from_pretrained(str(decoder_dir(config.model)), torch_dtype=torch.float32).eval()
    prompt = prompts.describe_prompt(tokenizer)
    rng = np.random.default_rng(0)
    print(f"cpu cores: {os.cpu_count()}, torch threads: {torch.get_num_threads()}, jax: {jax.default_backend()}, "
          f"load average: {os.getloadavg()[0]:.1f}; prompt {len(prompt)} tokens, {_NEW.value} new tokens")
    for batch in (int(b) for b in _BATCHES.value):
        vectors = rng.standard_normal((batch, 1, int(config.model.domain_dim))).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=-1, keepdims=True)
        tokens = jnp.asarray([prompt] * batch, jnp.int32)
        embeds = torch.from_numpy(np.array(model.input_embeddings(tokens, jnp.asarray(vectors))))
        mask = torch.ones(embeds.shape[:2], dtype=torch.long)

        def ours(n: int, m=model) -> list[list[int]]:
            return generate(m, [prompt] * batch, list(vectors), SamplingConfig(max_new_tokens=n, batch_size=batch))

        def ours_int8(n: int) -> list[list[int]]:
            return ours(n, int8)

        def theirs(n: int) -> list[list[int]]:
            with torch.inference_mode():
                out = hf.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, pad_token_id=tokenizer.pad_id)
            return out[:, -n:].tolist()

        a, b = ours(_NEW.value), theirs(_NEW.value)  # warm-up (compiles ctelm_jax) and agreement check
        ours(1)
        agree = np.mean([x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb)])
        runs = {"ours": ours, "theirs": theirs, **({"int8": ours_int8} if _INT8.value else {})}
        if _INT8.value:
            q = ours_int8(_NEW.value)
            ours_int8(1)
            agree_int8 = np.mean([x == y for ra, rq in zip(a, q) for x, y in zip(ra, rq)])
        times: dict[str, list[float]] = {k + s: [] for k in runs for s in ("", "_first")}
        for _ in range(_REPS.value):
            for name, fn in runs.items():
                times[name].append(_time(lambda: fn(_NEW.value)))
                times[name + "_first"].append(_time(lambda: fn(1)))
        med = {k: statistics.median(v) for k, v in times.items()}
        tok = batch * _NEW.value
        print(f"batch {batch:2d}: ctelm_jax {tok / med['ours']:7.1f} tok/s (first token {med['ours_first'] * 1e3:6.0f} "
              f"ms) | transformers {tok / med['theirs']:7.1f} tok/s (first token {med['theirs_first'] * 1e3:6.0f} ms)"
              f" | speed ratio {med['theirs'] / med['ours']:.2f}x, first-token ratio "
              f"{med['theirs_first'] / med['ours_first']:.2f}x | greedy tokens agreeing: {agree:.1%} | "
              f"runs (s): ours {[round(t, 2) for t in times['ours']]}, theirs {[round(t, 2) for t in times['theirs']]}")
        if _INT8.value:
            print(f"batch {batch:2d}: ctelm_jax int8 {tok / med['int8']:7.1f} tok/s (first token "
                  f"{med['int8_first'] * 1e3:6.0f} ms) | speed ratio to transformers {med['theirs'] / med['int8']:.2f}x,"
                  f" to float32 ctelm_jax {med['ours'] / med['int8']:.2f}x | greedy tokens agreeing with float32: "
                  f"{agree_int8:.1%} | runs (s): {[round(t, 2) for t in times['int8']]}")


if __name__ == "__main__":
    app.run(main)
