"""Weight-only int8 decoding against float32 on a trained run: greedy `describe` texts and their re-embed cosine.

    .venv/bin/python bench/int8_quality.py --workdir=runs/default [--n=32] [--split=test]

Takes the evaluation's describe setting (`eval.suite.EvalSizes`: the same trials of the split, token budget,
repetition settings, batch), decodes each trial's embedding greedily with the run's model and with `quantize_elm` of
it, re-embeds both texts with the run's frozen encoder and prints: identical texts, token agreement up to the first
difference, mean cosine of each to the input vector, the mean and largest per-trial |difference| of the cosines, and
seconds per text. Results go to BENCHMARKS.md by hand.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ctelm_jax import prompts  # noqa: E402
from ctelm_jax.eval.suite import EvalSizes, _pick  # noqa: E402
from ctelm_jax.models.quantize import quantize_elm  # noqa: E402
from ctelm_jax.run.corpus import load_splits, run_encoder  # noqa: E402
from ctelm_jax.run.trained import load_trained  # noqa: E402
from ctelm_jax.vectors import cosine_rows  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "A trained run.")
_N = flags.DEFINE_integer("n", 32, "Trials (the evaluation's n_test).")
_SPLIT = flags.DEFINE_string("split", "test", "Split the trials come from.")


def _common_prefix(a: str, b: str) -> int:
    """Characters before the first difference."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main(argv: Sequence[str]) -> None:
    """Decodes the trials with both models and prints the comparison."""
    del argv
    sizes = EvalSizes(n_test=_N.value, split=_SPLIT.value)
    model, tokenizer, config, step = load_trained(_WORKDIR.value)
    held_out = load_splits(config, _WORKDIR.value)[sizes.split]
    rows = _pick(len(held_out.records), sizes.n_test, np.random.default_rng(sizes.seed))
    vectors = held_out.embeddings[rows]
    cfg = prompts.sampling_config(tokenizer, sizes.max_new_tokens, sizes.batch_size,
                                  repetition_penalty=sizes.repetition_penalty,
                                  no_repeat_ngram_size=sizes.no_repeat_ngram_size)
    describe = prompts.describe_prompt(tokenizer)
    encode, note = run_encoder(config)
    if encode is None:
        raise SystemExit(f"no encoder to re-embed with: {note}")
    texts, seconds = {}, {}
    for name, m in (("float32", model), ("int8", quantize_elm(model))):
        prompts.decode_texts(m, tokenizer, [describe], [vectors[0][None]], cfg)  # compile outside the timing
        start = time.perf_counter()
        texts[name] = prompts.decode_texts(m, tokenizer, [describe] * len(rows), [v[None] for v in vectors], cfg)
        seconds[name] = (time.perf_counter() - start) / len(rows)
    cos = {name: cosine_rows(encode(t), vectors) for name, t in texts.items()}
    diff = np.abs(cos["int8"] - cos["float32"])
    same = sum(a == b for a, b in zip(texts["float32"], texts["int8"]))
    prefix = np.mean([_common_prefix(a, b) / max(len(a), 1) for a, b in zip(texts["float32"], texts["int8"])])
    print(f"run {_WORKDIR.value} step {step}, {len(rows)} {sizes.split} trials, greedy describe "
          f"({sizes.max_new_tokens} new tokens, repetition penalty {sizes.repetition_penalty}, no-repeat "
          f"{sizes.no_repeat_ngram_size}-grams), load average {os.getloadavg()[0]:.1f}")
    print(f"identical texts: {same}/{len(rows)}; float32 text matched up to the first difference: {prefix:.1%}")
    print(f"re-embed cosine: float32 {cos['float32'].mean():.4f}, int8 {cos['int8'].mean():.4f}, "
          f"difference of means {cos['int8'].mean() - cos['float32'].mean():+.4f}; per trial |diff| mean "
          f"{diff.mean():.4f}, max {diff.max():.4f}")
    print(f"seconds per text (batch {sizes.batch_size}): float32 {seconds['float32']:.2f}, int8 {seconds['int8']:.2f}")


if __name__ == "__main__":
    app.run(main)
