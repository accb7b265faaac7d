"""Step metrics: FLOPs per token and MFU, per-task losses, TensorBoard event files."""

from __future__ import annotations

import json
import os
import secrets
import time
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ctelm_jax import fs
from ctelm_jax.models.llama import LlamaConfig

# Dense peak FLOP/s per device for the compute dtype (vendor figures); CPU is measured instead.
PEAK_FLOPS = {
    ("tpu v4", "bfloat16"): 275e12, ("tpu v5 lite", "bfloat16"): 197e12, ("tpu v5", "bfloat16"): 459e12,
    ("tpu v5p", "bfloat16"): 459e12, ("nvidia h100", "bfloat16"): 989e12, ("nvidia h200", "bfloat16"): 989e12,
    ("nvidia a100", "bfloat16"): 312e12, ("nvidia h100", "float32"): 67e12, ("nvidia a100", "float32"): 19.5e12,
}


def forward_flops_per_token(cfg: LlamaConfig, seq_len: int) -> float:
    """Matmul FLOPs of one token's forward pass: projections, MLP, LM head, and causal attention scores."""
    d, h, kv, f = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    per_layer = 2 * (d * h + 2 * d * kv + h * d + 3 * d * f)
    attention = 2 * 2 * h * seq_len / 2  # QK^T and AV, causal half
    return cfg.num_layers * (per_layer + attention) + 2 * d * cfg.vocab_size


def train_flops_per_token(cfg: LlamaConfig, seq_len: int, decoder_trained: bool) -> float:
    """Forward + backward: 3x forward when weights get gradients, 2x when only activations do (frozen decoder)."""
    return (3.0 if decoder_trained else 2.0) * forward_flops_per_token(cfg, seq_len)


def peak_flops_per_device(dtype: str) -> float:
    """Peak FLOP/s of one local device: the vendor figure, or a measured matmul rate on CPU."""
    device = jax.local_devices()[0]
    kind = device.device_kind.lower()
    for (name, dt), flops in PEAK_FLOPS.items():
        if kind.startswith(name) and dt == dtype:
            return flops
    return measure_matmul_flops(jnp.dtype(dtype))


def measure_matmul_flops(dtype: jnp.dtype, n: int = 1024, repeats: int = 5) -> float:
    """Best-of-`repeats` FLOP/s of an n x n matmul on the default device (the CPU 'peak')."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    # A forced host device count splits the CPU: each fake device gets its share of the measured rate.
    return 2 * n**3 / best / max(1, jax.local_device_count() if jax.default_backend() == "cpu" else 1)


def task_losses(metrics: Mapping[str, np.ndarray], tasks: Sequence[str]) -> dict[str, float]:
    """Mean loss per task present in the batch."""
    sums, counts = np.asarray(metrics["task_loss_sum"]), np.asarray(metrics["task_tokens"])
    return {t: float(sums[i] / counts[i]) for i, t in enumerate(tasks) if counts[i] > 0}


class EventWriter:
    """Scalars to a TensorBoard event file (process 0 only) and to a JSONL log beside them, in a local or remote
    (gs://) folder. Both are written synchronously and flushed at every `write`; a remote folder is written locally
    and uploaded then (`fs.MirroredDir`), so a killed run loses at most the scalars of the `write` in progress."""

    def __init__(self, logdir: str | os.PathLike):
        self.enabled = jax.process_index() == 0
        if self.enabled:
            from tensorboardX.event_file_writer import EventsWriter
            self._dir = fs.MirroredDir(logdir)
            # The suffix keeps a resumed run within the same second from reusing (truncating) the last file's name.
            self._events = EventsWriter(str(self._dir.local / "events"), filename_suffix=f".{secrets.token_hex(4)}")
            self._jsonl = open(self._dir.local / "metrics.jsonl", "a")

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        """Logs scalars at a step."""
        if not self.enabled:
            return
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        wall_time = time.time()
        for k, v in scalars.items():
            self._events.write_event(Event(wall_time=wall_time, step=step, summary=scalar(k, float(v))))
        self._jsonl.write(json.dumps({"step": step, **{k: float(v) for k, v in scalars.items()}}) + "\n")
        self._events.flush()
        self._jsonl.flush()
        self._dir.sync()

    def close(self) -> None:
        """Flushes and closes the files (uploading a remote folder's last changes)."""
        if self.enabled:
            self._events.close()
            self._jsonl.close()
            self._dir.close()
