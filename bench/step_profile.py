"""Where a training step's time goes: ctelm_jax (XLA's own profile of the compiled step) against transformers + PEFT
(torch.profiler), on `bench/train_step.py`'s model, batch and step.

    .venv/bin/python bench/step_profile.py [--setting=lora|full] [--steps=3] [--batch=4] [--seq=256]
    .venv/bin/python bench/step_profile.py --framework=jax --setting=lora   # one side only, its table

Each framework runs in a process of its own, one after the other: one warm-up step, `--steps` timed steps without the
profiler (their median is the table's last row), then `--steps` profiled steps. Every executed operation's own time
(XLA: each thunk of the compiled step, named by the HLO instruction it runs; PyTorch: each op's self time) goes to one
category, by what it computes (a dot, a transpose or copy, the rest) and where in the model it comes from (the Python
frames XLA keeps in the HLO's metadata; for PyTorch the op, its input shapes and the enclosing autograd / optimizer
ranges). XLA:CPU runs independent thunks on its two threads at once, each mostly on one core, while PyTorch runs one
op at a time on both cores: so an XLA row is its share of the threads' busy time, in seconds of the time some thread
was busy, and both tables add up to the step's wall time. Backward is what runs under the gradient (XLA: the
`transpose(jvp(...))` name stack; PyTorch: the autograd engine). "Host" is the step's wall time outside every
operation: dispatch, Python, waiting. Printed: a markdown table of seconds per step by category, with shares.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step  # noqa: E402  (bench/train_step.py: the model, the batch and both steps)

REPO = Path(__file__).resolve().parents[1]
ROWS = (
    "projections (base weights)", "LoRA", "attention: score + value products", "attention: softmax + mask",
    "attention (PyTorch: one fused kernel)", "LM head", "loss", "elementwise (norms, RoPE, SwiGLU, residuals)",
    "layout (transposes, copies)", "embedding + adapter", "optimizer", "other", "host (outside any op)",
)

# ---------------------------------------------------------------------------------------------------- XLA side


def parse_hlo(text: str) -> tuple[dict[str, dict], dict[str, list[str]], dict[int, list[tuple[str, str]]]]:
    """The compiled module's instructions {name: {op, computation, op_name, frame, calls}}, each computation's
    instruction names, and each stack frame's (file, function) chain, innermost first."""
    files, functions, locations, parents = {}, {}, {}, {}
    section = None
    instructions, computations = {}, collections.defaultdict(list)
    current = None
    for line in text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = line
            continue
        if not line.strip():
            section = None
            continue
        if section:
            key, _, rest = line.partition(" ")
            if section == "FileNames":
                files[int(key)] = rest.strip('"')
            elif section == "FunctionNames":
                functions[int(key)] = rest.strip('"')
            elif section == "FileLocations":
                f = dict(re.findall(r"(\w+)=(\d+)", rest))
                locations[int(key)] = (files[int(f["file_name_id"])], functions[int(f["function_name_id"])],
                                       int(f["line"]))
            else:
                f = dict(re.findall(r"(\w+)=(\d+)", rest))
                parents[int(key)] = (int(f["file_location_id"]), int(f["parent_frame_id"]))
            continue
        head = re.match(r"^(?:ENTRY )?%(\S+) \(", line)
        if head and line.rstrip().endswith("{"):
            current = head.group(1)
            continue
        m = re.match(r"^\s+(?:ROOT )?%(\S+) = .*? ([a-z][a-z0-9-]*)\(", line)
        if m and current:
            name, op = m.groups()
            meta = re.search(r'op_name="([^"]*)"', line)
            frame = re.search(r"stack_frame_id=(\d+)", line)
            calls = re.findall(r"(?:calls|to_apply|body|condition)=%([\w.-]+)", line)
            instructions[name] = dict(op=op, computation=current, op_name=meta.group(1) if meta else "",
                                      frame=int(frame.group(1)) if frame else 0, calls=calls,
                                      batched="lhs_batch_dims=" in line)
            computations[current].append(name)
    chains: dict[int, list[tuple[str, str, int]]] = {}
    for frame in parents:
        chain, f, seen = [], frame, set()
        while f in parents and f not in seen:
            seen.add(f)
            loc, parent = parents[f]
            chain.append(locations[loc])
            f = parent
        chains[frame] = chain
    return instructions, computations, chains


def component(chain: list[tuple[str, str, int]]) -> str:
    """The model part a stack (innermost first) belongs to."""
    for file, function, _ in chain:
        if "/optax/" in file:
            return "optimizer"
        if "ctelm_jax" not in file:
            continue
        name = file.split("ctelm_jax/", 1)[1]
        if name in ("models/adapter.py", "models/elm.py", "models/embed_head.py"):
            return "embedding + adapter"
        if name == "models/lora.py":
            return "LoRA"
        if name == "models/layers.py" and function.endswith("Dense.__call__"):
            return "projections (base weights)"
        if name == "models/attention.py":
            return "attention: softmax + mask"
        if name == "models/llama.py":
            if function.endswith("logits"):
                return "LM head"
            if function.endswith("embed"):
                return "embedding + adapter"
            return "elementwise (norms, RoPE, SwiGLU, residuals)"
        if name == "models/layers.py":  # RMSNorm
            return "elementwise (norms, RoPE, SwiGLU, residuals)"
        if name == "train/loss.py":
            return "loss"
        if name == "train/step.py":
            return "loss" if function in ("token_losses", "loss_and_metrics", "loss_fn") else "optimizer"
        if name == "train/optimizer.py":
            return "optimizer"
    return "other"


LAYOUT_OPS = {"transpose", "copy", "bitcast", "reshape", "parameter", "concatenate", "slice", "dynamic-slice",
              "dynamic-update-slice", "pad", "tuple", "get-tuple-element", "broadcast", "constant", "copy-start",
              "copy-done"}


def classify(name: str, instructions: dict, computations: dict, chains: dict) -> tuple[str, str]:
    """(row, 'fwd' | 'bwd' | '') of one executed instruction (a fusion: by what it fuses). Attention's products are
    the step's only batched dots (XLA keeps no source frames for them, nor a way to tell scores from values)."""
    ins = instructions[name]
    inside, todo = [], [name]
    while todo:
        n = todo.pop()
        inside.append(instructions[n])
        if instructions[n]["op"] in ("fusion", "call", "custom-call"):
            for comp in instructions[n]["calls"]:
                todo.extend(computations.get(comp, []))
    ops = {i["op"] for i in inside} - {"fusion", "call"}
    dots = [i for i in inside if i["op"] in ("dot", "convolution")]
    carrier = dots[0] if dots else next((i for i in inside if i["frame"]), ins)
    where = component(chains.get(carrier["frame"], []))
    op_name = carrier["op_name"] or ins["op_name"]
    phase = "bwd" if "transpose(" in op_name else "fwd" if "jvp(" in op_name else ""
    if not dots and ops <= LAYOUT_OPS and where != "optimizer":
        return "layout (transposes, copies)", phase
    if any(d["batched"] for d in dots):
        return "attention: score + value products", phase
    if dots:
        return where, phase
    if where in ("projections (base weights)", "LoRA"):  # an elementwise fusion around a projection: the scale
        return "elementwise (norms, RoPE, SwiGLU, residuals)", phase
    return where, phase


def covered(intervals: list[tuple[int, int]]) -> int:
    """Length of the union of [start, end) intervals."""
    total, end = 0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def jax_profile(setting: str, batch: dict, steps: int, model: str) -> dict:
    """Seconds per step by row and phase, and the step's wall time, from XLA's profile of the compiled step."""
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()
    import jax
    from jax.profiler import ProfileData

    step, ts, batch = train_step.jax_step(setting, batch, model, "float32")
    compiled = step.lower(ts, batch).compile()
    instructions, computations, chains = parse_hlo(compiled.as_text())
    plain = []
    for _ in range(steps + 1):  # the first: warm-up
        t = time.perf_counter()
        ts, m = compiled(ts, batch)
        jax.block_until_ready(m)
        plain.append(time.perf_counter() - t)
    trace_dir = tempfile.mkdtemp()
    with jax.profiler.trace(trace_dir):
        t = time.perf_counter()
        for _ in range(steps):
            ts, m = compiled(ts, batch)
            jax.block_until_ready(m)
        wall = (time.perf_counter() - t) / steps
    data = ProfileData.from_file(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0])
    thread_seconds: dict = collections.defaultdict(float)
    cache: dict[str, tuple[str, str]] = {}
    intervals = []
    for plane in data.planes:
        for line in plane.lines:  # XLA:CPU runs independent thunks on its threads at once: one line per thread
            events = sorted(((e.start_ns, e.duration_ns, e.name) for e in line.events if e.name in instructions),
                            key=lambda e: (e[0], -e[1]))
            stack: list[list] = []  # [end_ns, name, own_ns]
            done = []
            for start, dur, name in events:
                while stack and stack[-1][0] <= start:
                    done.append(stack.pop())
                if stack:
                    stack[-1][2] -= dur
                else:
                    intervals.append((start, start + dur))
                stack.append([start + dur, name, dur])
            done.extend(stack)
            for _, name, own in done:
                if name not in cache:
                    cache[name] = classify(name, instructions, computations, chains)
                thread_seconds[cache[name]] += own
    busy = covered(intervals) / 1e9 / steps
    total = sum(thread_seconds.values())
    # Each category's share of the busy threads' time, in seconds of the step's wall time.
    seconds = {key: busy * ns / total for key, ns in thread_seconds.items()}
    seconds[("host (outside any op)", "")] = max(0.0, wall - busy)
    return {"wall": wall, "plain": statistics.median(plain[1:]),
            "seconds": {f"{r}|{p}": s for (r, p), s in seconds.items()}}


# ------------------------------------------------------------------------------------------------ PyTorch side


def torch_row(event, vocab: int, n_embeddings: int) -> str:
    """The row of one profiled PyTorch op (its self time)."""
    name = event.name
    ancestors, parent = [], event.cpu_parent
    while parent is not None:
        ancestors.append(parent.name)
        parent = parent.cpu_parent
    if any(a.startswith("Optimizer.") or a == "optimizer" for a in ancestors):
        return "optimizer"
    if not name.startswith("aten::"):
        return "other"
    if any("scaled_dot_product" in a for a in ancestors + [name]):
        return "attention (PyTorch: one fused kernel)"
    if any(k in a for a in ancestors + [name] for k in ("log_softmax", "nll_loss", "cross_entropy")):
        return "loss"
    shapes = [tuple(s) for s in (event.input_shapes or []) if isinstance(s, (list, tuple)) and s]
    dims = {d for s in shapes for d in s}
    if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm"):
        if vocab in dims:
            return "LM head"
        if train_step.DOMAIN in dims or any(s[0] == n_embeddings for s in shapes):
            return "embedding + adapter"
        if train_step.LORA_RANK in dims:
            return "LoRA"
        return "projections (base weights)"
    if name in ("aten::copy_", "aten::clone", "aten::contiguous", "aten::cat", "aten::to", "aten::_to_copy",
                "aten::t", "aten::transpose", "aten::permute", "aten::view", "aten::reshape", "aten::expand",
                "aten::_unsafe_view", "aten::as_strided", "aten::slice", "aten::select", "aten::unsqueeze"):
        return "layout (transposes, copies)"
    if any(k in name for k in ("embedding", "gather", "where", "masked_fill", "index")):
        return "embedding + adapter"
    return "elementwise (norms, RoPE, SwiGLU, residuals)"


def torch_profile(setting: str, batch: dict, steps: int, model: str, placeholder: int) -> dict:
    """Seconds per step by row and phase, and the step's wall time, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    step = train_step.torch_step(setting, batch, model, placeholder, "float32")
    plain = []
    for _ in range(steps + 1):  # the first: warm-up
        t = time.perf_counter()
        step()
        plain.append(time.perf_counter() - t)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            step()
        wall = (time.perf_counter() - t) / steps
    vocab = 49152
    n_embeddings = batch["embeddings"].shape[0] * batch["embeddings"].shape[1]
    seconds: dict = collections.defaultdict(float)
    busy = 0.0
    for e in prof.events():
        own = e.self_cpu_time_total / 1e6 / steps
        chain, parent = [e.name], e.cpu_parent
        while parent is not None:
            chain.append(parent.name)
            parent = parent.cpu_parent
        if e.cpu_parent is None:
            busy += e.cpu_time_total / 1e6 / steps
        phase = "bwd" if any(c.startswith("autograd::engine") or "Backward" in c for c in chain) else "fwd"
        row = torch_row(e, vocab, n_embeddings)
        seconds[(row, "" if row == "optimizer" else phase)] += own
    seconds[("host (outside any op)", "")] += max(0.0, wall - busy)
    return {"wall": wall, "plain": statistics.median(plain[1:]),
            "seconds": {f"{r}|{p}": s for (r, p), s in seconds.items()}}


# --------------------------------------------------------------------------------------------------- driver


def worker(args: argparse.Namespace) -> None:
    """One framework's profile as JSON on stdout."""
    from ctelm_jax.weights.default import default_decoder_dir
    from ctelm_jax.weights.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(default_decoder_dir())
    batch = train_step.make_batch(args.batch, args.seq, 49152 - 1, tok.placeholder_id)
    if args.framework == "jax":
        out = jax_profile(args.setting, batch, args.steps, args.model)
    else:
        out = torch_profile(args.setting, batch, args.steps, args.model, tok.placeholder_id)
    print("RESULT " + json.dumps(out))


def table(results: dict[str, dict]) -> str:
    """The markdown table: per row, each framework's forward / backward / total seconds per step and share."""
    fws = list(results)
    head = "| category | " + " | ".join(f"{fw} fwd s | {fw} bwd s | {fw} total s | {fw} share" for fw in fws) + " |"
    lines = [head, "|---|" + "---|" * 4 * len(fws)]
    for row in ROWS:
        cells, any_time = [], False
        for fw in fws:
            s = results[fw]["seconds"]
            fwd, bwd, other = (s.get(f"{row}|{p}", 0.0) for p in ("fwd", "bwd", ""))
            total = fwd + bwd + other
            any_time |= total > 0
            cells.append(f"{fwd:.3f} | {bwd:.3f} | {total:.3f} | {total / results[fw]['wall']:.1%}")
        if any_time:
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines.append("| **step (wall, profiled)** | " + " | ".join(
        f" | | **{results[fw]['wall']:.3f}** | 100%" for fw in fws) + " |")
    lines.append("| step without the profiler (median) | " + " | ".join(
        f" | | {results[fw]['plain']:.3f} | " for fw in fws) + " |")
    return "\n".join(lines)


def main() -> None:
    """Runs the requested frameworks one after the other and prints the table."""
    p = argparse.ArgumentParser()
    p.add_argument("--setting", default="lora", choices=("lora", "full"))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--model", default="default", choices=("default", "1b"))
    p.add_argument("--framework", help="jax or torch: that side only")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    results = {}
    for fw in ([args.framework] if args.framework else ["jax", "torch"]):
        out = subprocess.run([sys.executable, __file__, "--worker", f"--framework={fw}", f"--setting={args.setting}",
                              f"--steps={args.steps}", f"--batch={args.batch}", f"--seq={args.seq}",
                              f"--model={args.model}"], cwd=REPO, capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{fw} worker failed:\n{out.stderr[-3000:]}")
        results[fw] = json.loads(out.stdout.split("RESULT ", 1)[1])
    print(f"setting {args.setting}, batch {args.batch} x {args.seq}, {args.steps} profiled steps after a warm-up step")
    print(table(results))


if __name__ == "__main__":
    main()
