"""Step metrics: FLOPs per token and MFU, per-task losses, TensorBoard event files."""

from __future__ import annotations

import json
import os
import secrets
import struct
import time
from typing import Iterator, Mapping, Sequence

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


def tfrecords(data: bytes) -> Iterator[bytes]:
    """The whole records of a TFRecord (event) file, each frame as stored (8-byte length, its CRC, data, the data's
    CRC); a torn last frame, as a kill mid-write leaves it, is left out."""
    at = 0
    while at + 12 <= len(data):
        (length,) = struct.unpack("<Q", data[at:at + 8])
        end = at + 12 + length + 4
        if end > len(data):
            return
        yield data[at:end]
        at = end


def event_scalars(data: bytes) -> list[tuple[int, str, float]]:
    """(step, tag, value) of every scalar in an event file's bytes."""
    from tensorboardX.proto.event_pb2 import Event

    out = []
    for frame in tfrecords(data):
        event = Event.FromString(frame[12:-4])
        out.extend((event.step, v.tag, v.simple_value) for v in event.summary.value)
    return out


def _event_step(frame: bytes) -> int:
    from tensorboardX.proto.event_pb2 import Event

    return Event.FromString(frame[12:-4]).step


def _jsonl_step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None  # a torn last line


def _rewrite(path: os.PathLike, data: bytes) -> None:
    """Replaces a local file's bytes in one rename."""
    tmp = f"{os.fspath(path)}.tmp-{secrets.token_hex(4)}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class EventWriter:
    """Scalars to a TensorBoard event file (process 0 only) and to a JSONL log beside them, in a local or remote
    (gs://) folder. Both are written synchronously and flushed at every `write`; a remote folder is written locally
    and uploaded then (`fs.MirroredDir`), so a killed run loses at most the scalars of the `write` in progress.

    A run that (re)starts at step `resume_step` (0: from scratch) first drops the rows of later steps (and torn records) from the logs
    already there: they were logged by a run killed before it saved them, and the resumed run logs those steps again,
    so the logs hold one row per step whatever was killed when."""

    def __init__(self, logdir: str | os.PathLike, resume_step: int | None = None):
        self.enabled = jax.process_index() == 0
        if self.enabled:
            from tensorboardX.event_file_writer import EventsWriter
            self._dir = fs.MirroredDir(logdir)
            if resume_step is not None:
                self._drop_rows_after(resume_step)
            # The suffix keeps a resumed run within the same second from reusing (truncating) the last file's name.
            self._events = EventsWriter(str(self._dir.local / "events"), filename_suffix=f".{secrets.token_hex(4)}")
            self._jsonl = open(self._dir.local / "metrics.jsonl", "a")

    def _drop_rows_after(self, step: int) -> None:
        """Rewrites the logs without rows of steps after `step` or torn ones; files that hold none stay as they are."""
        for path in sorted(self._dir.local.iterdir()):
            if path.name == "metrics.jsonl":
                lines = path.read_text().splitlines(keepends=True)
                kept = [ln for ln in lines if ln.endswith("\n") and (s := _jsonl_step(ln)) is not None and s <= step]
                if kept != lines:
                    _rewrite(path, "".join(kept).encode())
            elif path.name.startswith("events.out.tfevents."):
                data = path.read_bytes()
                kept = b"".join(f for f in tfrecords(data) if _event_step(f) <= step)
                if kept != data:
                    _rewrite(path, kept)
        self._dir.sync()

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
