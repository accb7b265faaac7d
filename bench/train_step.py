"""Training step, ctelm_jax vs transformers + PEFT (the OpenELM stack), same model, batch and machine.

    .venv/bin/python bench/train_step.py [--reps=3] [--steps=3] [--batch=4] [--seq=256] [--settings=lora,full]
    .venv/bin/python bench/train_step.py --model=1b --settings=lora --batch=1 --reps=2 --steps=2
    .venv/bin/python bench/train_step.py --dtype=bfloat16      # both compute in bf16 (torch: CPU autocast)

`--model=default` is the embedded SmolLM2-135M-Instruct; `--model=1b` a randomly initialised decoder of
Llama-3.2-1B's shape (16 layers, hidden 2048, 32 / 8 heads, vocab 128,256, tied), the 1B class that fits in this
machine's memory for LoRA (full fine-tuning in fp32 would need ~20 GB for weights and Adam alone).

The driver alternates worker processes (jax, torch, jax, torch, ...) so both see the same machine state; each worker
builds its model once, times `--steps` steps after warm-up steps (jax: two, torch: one), and reports step times and its
peak resident memory. A worker's median moves by up to 10% from one process to the next on this 2-core host (jax
5.5-6.6 s for the same LoRA step, 2026-12-08), so compare two versions of ctelm_jax in one process
(`bench/step_profile.py`'s tables, or both steps compiled side by side), not across workers. Printed: median
tokens/s, MFU, peak memory per framework and setting, and the jax/torch ratio.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # configs/ lives at the repo root
LORA_RANK, LORA_ALPHA, LORA_TARGETS, DOMAIN, ADAPTER_HIDDEN = 16, 32.0, ("q_proj", "k_proj"), 384, 1024
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                num_kv_heads=8, rope_theta=500000.0, tie_word_embeddings=True, max_position_embeddings=4096)


def model_config(model: str, dtype: str = "float32"):
    """The `model` section of a config for the benchmarked decoder, computing in `dtype` (f32 parameters)."""
    from configs.base import base_config

    c = base_config()
    c.model.lora_rank, c.model.lora_alpha, c.model.lora_targets = LORA_RANK, LORA_ALPHA, LORA_TARGETS
    c.model.dtype = dtype
    if model == "1b":
        c.model.decoder, c.model.tokenizer, c.model.arch = "random", "default", dict(LLAMA_1B)
    return c.model


def make_batch(batch: int, seq: int, vocab: int, placeholder: int) -> dict[str, np.ndarray]:
    """One fixed batch: random tokens, two placeholders per row, loss on the second half."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, (batch, seq)).astype(np.int32)
    tokens[:, [5, 9]] = placeholder
    mask = np.zeros((batch, seq), np.float32)
    mask[:, seq // 2:-1] = 1
    return {"tokens": tokens, "targets": np.roll(tokens, -1, axis=1), "loss_mask": mask,
            "segment_ids": np.ones((batch, seq), np.int32),
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
            "embeddings": rng.standard_normal((batch, 2, DOMAIN)).astype(np.float32),
            "task_ids": np.zeros((batch, seq), np.int32), "pool_ids": np.zeros((batch, seq), np.int32),
            "embed_targets": np.zeros((batch, 2, DOMAIN), np.float32)}


def jax_step(setting: str, batch: dict, model: str, dtype: str):
    """ctelm_jax's jitted train step (state donated), its initial state and the batch on the device."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from ctelm_jax.run.build import build_elm, load_tokenizer
    from ctelm_jax.train.optimizer import make_optimizer, param_labels
    from ctelm_jax.train.step import TrainState, make_train_step

    m = model_config(model, dtype)
    graphdef, state = nnx.split(build_elm(m, load_tokenizer(m)))
    params = nnx.to_pure_dict(state)
    labels = param_labels(params, ("adapter", "lora") if setting == "lora" else ("adapter", "decoder"))
    tx = make_optimizer(labels, optax.constant_schedule(1e-5))
    ts = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    step = jax.jit(make_train_step(graphdef, labels, tx, 1), donate_argnums=0)
    return step, ts, {k: jnp.asarray(v) for k, v in batch.items()}


def jax_worker(setting: str, batch: dict, steps: int, model: str, dtype: str) -> list[float]:
    """Step times of ctelm_jax's compiled train step."""
    import jax

    step, ts, batch = jax_step(setting, batch, model, dtype)
    times = []
    for _ in range(steps + 2):
        t = time.perf_counter()
        ts, m = step(ts, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    return times[2:]  # the first call compiles; the second, on the step's own (donated) outputs, took 3-5x a step


def torch_step(setting: str, batch: dict, model_name: str, placeholder: int, dtype: str) -> Callable[[], None]:
    """One train step of transformers' LlamaForCausalLM (+ PEFT LoRA) with the same adapter splice and loss, as a
    function; bfloat16: under CPU autocast (f32 parameters, bf16 matmuls), as ctelm_jax's dtype=bfloat16 computes."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers import LlamaForCausalLM

    from ctelm_jax.run.build import decoder_config
    from ctelm_jax.weights.default import default_decoder_dir

    torch.manual_seed(0)
    if model_name == "1b":
        model = LlamaForCausalLM(HFLlamaConfig(**decoder_config(model_config("1b")).to_hf_dict()))
    else:
        model = LlamaForCausalLM.from_pretrained(str(default_decoder_dir()), dtype=torch.float32)
    if setting == "lora":
        model = get_peft_model(model, LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA,
                                                 target_modules=list(LORA_TARGETS), lora_dropout=0.0))
    adapter = torch.nn.Sequential(torch.nn.Linear(DOMAIN, ADAPTER_HIDDEN), torch.nn.ReLU(),
                                  torch.nn.Linear(ADAPTER_HIDDEN, model.config.hidden_size))
    params = [p for p in model.parameters() if p.requires_grad] + list(adapter.parameters())
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    tokens = torch.tensor(batch["tokens"], dtype=torch.long)
    is_ph = tokens == placeholder
    targets = torch.tensor(batch["targets"], dtype=torch.long).clamp(max=model.config.vocab_size - 1)
    mask = torch.tensor(batch["loss_mask"])
    emb = torch.tensor(batch["embeddings"])
    slot = (is_ph.cumsum(1) - 1).clamp(min=0)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            x = model.get_input_embeddings()(tokens.masked_fill(is_ph, 0))
            soft = adapter(emb)
            x = torch.where(is_ph[..., None], torch.gather(soft, 1, slot[..., None].expand(-1, -1, x.shape[-1])), x)
            logits = model(inputs_embeds=x).logits.float()
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        loss = (nll * mask.flatten()).sum() / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    return step


def torch_worker(setting: str, batch: dict, steps: int, model_name: str, placeholder: int, dtype: str) -> list[float]:
    """Step times of the PyTorch step (`torch_step`)."""
    step = torch_step(setting, batch, model_name, placeholder, dtype)
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return times[1:]


def worker(args: argparse.Namespace) -> None:
    """Runs one framework/setting and prints its step times and peak RSS as JSON."""
    from ctelm_jax.weights.default import default_decoder_dir
    from ctelm_jax.weights.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(default_decoder_dir())
    batch = make_batch(args.batch, args.seq, 49152 - 1, tok.placeholder_id)
    if args.framework == "jax":
        times = jax_worker(args.setting, batch, args.steps, args.model, args.dtype)
    else:
        times = torch_worker(args.setting, batch, args.steps, args.model, tok.placeholder_id, args.dtype)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB (ru_maxrss is KiB on Linux)
    print("RESULT " + json.dumps({"times": times, "peak_gib": peak}))


def main() -> None:
    """Alternates workers and prints the comparison table."""
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--settings", default="lora,full")
    p.add_argument("--model", default="default", choices=("default", "1b"))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype of both")
    p.add_argument("--framework")
    p.add_argument("--setting")
    args = p.parse_args()
    if args.framework:
        return worker(args)
    from ctelm_jax.run.build import decoder_config
    from ctelm_jax.train.metrics import measure_matmul_flops, train_flops_per_token
    import jax.numpy as jnp

    cfg = decoder_config(model_config(args.model))
    peak_flops = measure_matmul_flops(jnp.float32)
    tokens = args.batch * args.seq
    print(f"machine peak (measured fp32 matmul): {peak_flops / 1e9:.1f} GFLOP/s; batch {args.batch}x{args.seq}; "
          f"compute {args.dtype}")
    print("| setting | framework | median step s | tokens/s | MFU | peak RSS GiB |\n|---|---|---|---|---|---|")
    for setting in args.settings.split(","):
        results: dict[str, dict] = {"jax": {"times": [], "peak": 0.0}, "torch": {"times": [], "peak": 0.0}}
        for _ in range(args.reps):
            for fw in ("jax", "torch"):
                out = subprocess.run([sys.executable, __file__, f"--framework={fw}", f"--setting={setting}",
                                      f"--model={args.model}", f"--dtype={args.dtype}",
                                      f"--steps={args.steps}", f"--batch={args.batch}", f"--seq={args.seq}"],
                                     cwd=REPO, capture_output=True, text=True, check=True)
                r = json.loads(out.stdout.split("RESULT ", 1)[1])
                results[fw]["times"] += r["times"]
                results[fw]["peak"] = max(results[fw]["peak"], r["peak_gib"])
        flops = train_flops_per_token(cfg, args.seq, setting == "full") * tokens
        med = {fw: statistics.median(r["times"]) for fw, r in results.items()}
        for fw in ("jax", "torch"):
            print(f"| {setting} | {fw} | {med[fw]:.2f} | {tokens / med[fw]:.0f} | {flops / med[fw] / peak_flops:.1%} "
                  f"| {results[fw]['peak']:.2f} |")
        print(f"| {setting} | **jax/torch tokens/s** | | **{med['torch'] / med['jax']:.2f}x** | | |")


if __name__ == "__main__":
    main()
