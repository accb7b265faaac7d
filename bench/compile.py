"""Compile time of the train step and of the decode loop, and how it grows with the sequence-length bucket.

    .venv/bin/python bench/compile.py [--seqs=64,128,256,512] [--prompts=16,32,64,128,256]

Train step (adapter + LoRA on the default SmolLM2-135M ELM, batch 4 x seq): seconds of `jit(...).lower(...)`
(tracing) and of `.compile()` (XLA), per sequence length. Decode (`generate`, batch 16, 16 new tokens): the first
call in a new prompt-length bucket minus a second call in it, i.e. what compiling that bucket costs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # configs/ lives at the repo root
from configs.default import get_config  # noqa: E402
from ctelm_jax.generate import SamplingConfig, length_bucket, generate  # noqa: E402
from ctelm_jax.run.build import build_elm, load_tokenizer  # noqa: E402
from ctelm_jax.train.optimizer import make_optimizer, param_labels  # noqa: E402
from ctelm_jax.train.step import TrainState, make_train_step  # noqa: E402
from train_step import make_batch  # noqa: E402


def train_compile(model, placeholder: int, seqs: list[int]) -> None:
    """Prints tracing and XLA compile seconds of the LoRA train step per sequence length."""
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    labels = param_labels(params, ("adapter", "lora"))
    tx = make_optimizer(labels, optax.constant_schedule(1e-5))
    ts = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    print("| train step seq (batch 4) | trace + lower s | XLA compile s |\n|---|---|---|")
    for seq in seqs:
        batch = {k: jnp.asarray(v) for k, v in make_batch(4, seq, 49151, placeholder).items()}
        step = jax.jit(make_train_step(graphdef, labels, tx, 1), donate_argnums=0)
        t0 = time.perf_counter()
        lowered = step.lower(ts, batch)
        t1 = time.perf_counter()
        lowered.compile()
        t2 = time.perf_counter()
        print(f"| {seq} | {t1 - t0:.1f} | {t2 - t1:.1f} |", flush=True)


def decode_compile(model, tokenizer, lengths: list[int]) -> None:
    """Prints the compile cost of `generate` per prompt-length bucket (batch 16, 16 new tokens)."""
    cfg = SamplingConfig(max_new_tokens=16, batch_size=16, pad_id=tokenizer.pad_id)
    rng = np.random.default_rng(0)
    print("\n| decode prompt tokens | bucket | first call s | second call s | compile s |\n|---|---|---|---|---|")
    for n in lengths:
        prompt = [tokenizer.placeholder_id] + rng.integers(0, 49152, n - 1).tolist()
        vectors = [rng.standard_normal((1, model.adapter.domain_dim)).astype(np.float32) for _ in range(16)]
        times = []
        for _ in range(2):
            t = time.perf_counter()
            generate(model, [prompt] * 16, vectors, cfg)
            times.append(time.perf_counter() - t)
        print(f"| {n} | {length_bucket(n)} | {times[0]:.1f} | {times[1]:.1f} | {times[0] - times[1]:.1f} |",
              flush=True)


def main() -> None:
    """Builds the default ELM once and prints both tables."""
    p = argparse.ArgumentParser()
    p.add_argument("--seqs", default="64,128,256,512")
    p.add_argument("--prompts", default="16,32,64,128,256")
    args = p.parse_args()
    config = get_config()
    tokenizer = load_tokenizer(config.model)
    model = build_elm(config.model, tokenizer)
    print(f"jax {jax.__version__} on {jax.default_backend()}, {jax.device_count()} device(s)")
    train_compile(model, tokenizer.placeholder_id, [int(s) for s in args.seqs.split(",")])
    decode_compile(model, tokenizer, [int(s) for s in args.prompts.split(",")])


if __name__ == "__main__":
    main()
