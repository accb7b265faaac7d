"""The training loop: curriculum stages, sharded jit steps, metrics, validation, orbax checkpoints, preemption."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from ctelm_jax import console, fs
from ctelm_jax.parallel.distributed import maybe_initialize_distributed
from ctelm_jax.parallel.mesh import make_mesh
from ctelm_jax.parallel.rules import as_rules, batch_sharding, constrainer, state_shardings
from ctelm_jax.run.build import build_elm, decoder_config, load_tokenizer, model_signature
from ctelm_jax.run.checkpoint import Checkpointer
from ctelm_jax.run.config import save_run_config
from ctelm_jax.run.corpus import load_splits
from ctelm_jax.run.export import maybe_export
from ctelm_jax.train import inputs, workdir_lock
from ctelm_jax.train.curriculum import Curriculum
from ctelm_jax.train.metrics import EventWriter, peak_flops_per_device, task_losses, train_flops_per_token
from ctelm_jax.train.precision import cast_frozen
from ctelm_jax.train.stage_step import stage_step
from ctelm_jax.train.step import TrainState, make_eval_step
from ctelm_jax.train.validate import check_config


class NonFiniteLoss(FloatingPointError):
    """Training produced a NaN/inf loss or gradient; the run stops before saving anything from it."""


class Interrupted(BaseException):
    """SIGTERM / SIGINT arrived while the run was doing work it can drop (like KeyboardInterrupt, not an Exception)."""


class Preemption:
    """SIGTERM and SIGINT for the whole run: inside `droppable()` (start-up, embedding, waiting for data, validation)
    a signal raises Interrupted at once; elsewhere (a step, a save, an export) it is a flag the loop checks after the
    step (save, then exit). Native code (a compile) runs to its end before either happens."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self.signum: int | None = None  # the first signal received
        self._droppable = False
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        self.signum = self.signum or signum
        if self._droppable:
            console.warn(f"{signal.Signals(signum).name} received: stopping now.")
            raise Interrupted(signal.Signals(signum).name)
        console.warn(f"{signal.Signals(signum).name} received: saving a checkpoint after this step, then exiting.")

    @contextlib.contextmanager
    def droppable(self) -> Iterator[None]:
        """A block whose work a signal drops (raising Interrupted), also one that came before the block."""
        if self.requested:
            raise Interrupted("stop requested")
        self._droppable = True
        try:
            yield
        finally:
            self._droppable = False

    def restore(self) -> None:
        """Puts the previous handlers back."""
        for s, previous in self._previous.items():
            signal.signal(s, previous)


def _place_batch(batch: dict[str, np.ndarray], mesh, rules) -> dict[str, jax.Array]:
    """This host's rows of a global batch -> global arrays sharded over the batch axes."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, rules, v.ndim), v) for k, v in batch.items()}


def _summarise(metrics: dict[str, Any], tasks: list[str]) -> dict[str, float]:
    out = {"loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"])}
    out.update({f"loss/{t}": v for t, v in task_losses(metrics, tasks).items()})
    if float(metrics.get("embed_texts", 0)) > 0:
        out["embed_cos"] = 1.0 - float(metrics["embed_loss"])  # cos(predicted, encoder) of the `embed` examples
    return out


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
    """Runs (or resumes) the curriculum of `config` in `workdir`, holding its lock (one run per workdir); returns a
    summary of the last metrics. SIGTERM or SIGINT ends it at any moment (status 'preempted', `signal` its number),
    saving first only a finished step that is not yet saved."""
    maybe_initialize_distributed(**config.distributed)  # before anything touches a device (check_config counts them)
    check_config(config)
    workdir = fs.as_path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    preemption = Preemption()
    try:
        with workdir_lock.hold(workdir), console.log_file(workdir):  # a run refused writes nothing
            summary = _train(config, workdir, preemption)
        if summary["status"] == "preempted":
            summary["signal"] = preemption.signum
        return summary
    finally:
        preemption.restore()


def _train(config: ml_collections.ConfigDict, workdir: epath.Path, preemption: Preemption) -> dict[str, Any]:
    """`train` in a workdir this run holds."""
    curriculum = Curriculum(config.stages, list(config.data.tasks))
    summary: dict[str, Any] = {"status": "preempted"}
    try:
        with preemption.droppable():
            if jax.process_index() == 0:
                save_run_config(workdir, config)
            mesh = make_mesh(dict(config.mesh))
            rules = as_rules(config.rules)
            tasks = list(config.data.tasks)
            tokenizer = load_tokenizer(config.model)
            data = load_splits(config, workdir)
            console.say(f"data: {', '.join(f'{len(s.records)} {n}' for n, s in data.items())} trials, "
                        f"{data['train'].embeddings.shape[1]}-d embeddings; log: {workdir / console.LOG_FILE}")
            concept_vectors = inputs.offset_vectors(curriculum, workdir, data["train"], config)
            edited = inputs.counterfactuals(curriculum, workdir, data["train"], config)
            # A resumed run restores the adapter statistics it started with over these.
            model = build_elm(config.model, tokenizer, constrain=constrainer(mesh, rules),
                              train_embeddings=data["train"].embeddings, mesh=mesh, rules=rules)
            graphdef, state = nnx.split(model)
            del model
            param_shardings = nnx.to_pure_dict(state_shardings(state, mesh, rules))
            # Created in their shards on the mesh: nothing to place. Groups no stage trains in model.frozen_dtype.
            params = cast_frozen(nnx.to_pure_dict(state), config.model, config.stages)
            del state
    except Interrupted:
        return summary
    signature = model_signature(config.model)

    ckpt = Checkpointer(workdir / "checkpoints", keep=config.checkpoint.keep, keep_best=config.checkpoint.keep_best,
                        async_save=config.checkpoint.async_save)
    writer = None  # opened once the resumed step is known: it drops the rows logged after that step
    dcfg = decoder_config(config.model)
    seq_len, global_batch = int(config.data.seq_len), int(config.data.global_batch_size)
    replicated = NamedSharding(mesh, PartitionSpec())
    peak = peak_flops_per_device(dcfg.dtype) * jax.device_count()
    loss_chunk = int(config.model.loss_chunk)
    eval_step = jax.jit(make_eval_step(graphdef, len(tasks), loss_chunk), in_shardings=(param_shardings, None))
    step, unsaved, unlogged = 0, False, None  # unlogged: the finished step's row, until it is written
    pending = None  # (step, metrics on the devices) of a dispatched step whose metrics are not read yet
    batches = None  # the stage's batch iterator (its thread is stopped however the run ends)
    try:
        with preemption.droppable():
            stage_index, data_state, restored = 0, None, None

            def read(at: int) -> tuple[int, int, Any, dict]:
                ckpt.check_meta(at, signature)
                _, progress, saved_data = ckpt.restore_meta(at)
                index = int(progress["stage"])
                built = stage_step(graphdef, params, param_shardings, curriculum.stages[index], len(tasks), mesh,
                                   loss_chunk)
                return (int(progress["step"]), index, saved_data,
                        ckpt.restore_state(at, _as_dict(built.abstract_state(params))))

            latest, resumed = ckpt.resume(read)
            if latest is not None:
                step, stage_index, data_state, restored = resumed
                console.say(f"resuming from step {step} of {ckpt.directory} (stage {stage_index + 1})")
            writer = EventWriter(workdir / "tb", resume_step=step)
        estimate = console.Estimate(curriculum.bounds(len(curriculum.stages) - 1)[1] - step)
        for index in range(stage_index, len(curriculum.stages)):
            stage = curriculum.stages[index]
            start, end = curriculum.bounds(index)
            resuming = latest is not None and index == stage_index
            with preemption.droppable():
                built = stage_step(graphdef, params, param_shardings, stage, len(tasks), mesh, loss_chunk)
                if resuming:
                    ts, restored = TrainState(**restored), None  # no second reference to the old state
                    params = ts.params
                else:
                    opt_state = jax.jit(built.tx.init, out_shardings=built.opt_shardings)(params)
                    ts = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), replicated), params=params,
                                    opt_state=opt_state)
            if step >= end:
                params = ts.params
                continue
            train_step = built.step
            with preemption.droppable():
                batches = inputs.train_batches(config, data["train"], tokenizer, stage,
                                               seed=int(config.data.seed) + index, concept_vectors=concept_vectors,
                                               edited=edited)
                if resuming and data_state is not None and step > start:
                    batches.set_state(data_state)
            flops_per_step = train_flops_per_token(dcfg, seq_len, "decoder" in stage.trainable) * global_batch * seq_len
            console.say(f"stage {index + 1}/{len(curriculum.stages)} {stage.name!r}: steps {start}..{end}, trains "
                        f"{'+'.join(stage.trainable)} on {', '.join(stage.task_weights)}")
            bar = tqdm(total=end - start, initial=step - start, desc=stage.name, disable=jax.process_index() != 0,
                       dynamic_ncols=True)
            last_read = time.perf_counter()

            def finish_step(at: int, metrics: dict) -> dict[str, float]:
                """Step `at`'s metrics, read from the devices (waiting for that step only), checked and summarised;
                its row is written unless `at` ends with validation (whose losses join the row) or a save."""
                nonlocal last_read, unlogged
                metrics = jax.device_get(metrics)
                now = time.perf_counter()
                dt, last_read = now - last_read, now  # between reads: the step period once steps overlap
                if not (math.isfinite(float(metrics["loss"])) and math.isfinite(float(metrics["grad_norm"]))):
                    raise NonFiniteLoss(
                        f"non-finite loss/grad at step {at} (stage {stage.name!r}, batch #{at - start} of its data "
                        f"stream, loss={float(metrics['loss'])}, grad_norm={float(metrics['grad_norm'])})"
                        + (f", found while step {step} ran (metrics are read a step late)" if step > at else "")
                        + f"; stopped without saving it. The last good checkpoint is step {ckpt.latest_step()} in "
                        f"{ckpt.directory}. Lower the learning rate or check the embeddings and data of that batch.")
                scalars = _summarise(metrics, tasks)
                scalars.update({"lr": float(stage.schedule()(at - start - 1)), "step_time_s": dt,
                                "tokens_per_s": global_batch * seq_len / dt, "mfu": flops_per_step / dt / peak,
                                "target_tokens": float(metrics["target_tokens"])})
                bar.set_postfix(loss=f"{scalars['loss']:.3f}", tok_s=f"{scalars['tokens_per_s']:.0f}",
                                mfu=f"{scalars['mfu']:.1%}")
                bar.update(1)
                estimate.step(dt)
                summary["last"] = scalars
                unlogged = scalars if at % config.log_every == 0 or at == end else None
                return scalars

            while step < end:
                with preemption.droppable():
                    batch_np = next(batches)  # built in the background while the previous step ran
                data_state = batches.get_state()  # after this step's batch: what a save of this step records
                ts, metrics = train_step(ts, _place_batch(batch_np, mesh, rules))  # dispatched, not awaited
                step, unsaved = step + 1, True
                if pending is not None:  # the previous step's metrics, while this one runs
                    finish_step(*pending)
                    if unlogged is not None:
                        writer.write(pending[0], unlogged)
                        unlogged = None
                pending = (step, metrics)
                validate = bool(config.eval.every_steps) and (step % config.eval.every_steps == 0 or step == end)
                save = step % config.checkpoint.every_steps == 0 or step == end or preemption.requested
                export = bool(config.export.every_steps) and step % config.export.every_steps == 0
                if not (validate or save or export):
                    continue
                scalars, pending = finish_step(*pending), None  # a step that is validated, saved or exported is checked
                val_loss = None
                if validate:
                    with preemption.droppable():
                        val_loss = evaluate(eval_step, ts.params, config, data["validation"], tokenizer, stage, mesh,
                                            rules, tasks, concept_vectors)
                    scalars.update({f"val/{k}": v for k, v in val_loss.items()})
                if unlogged is not None:
                    writer.write(step, unlogged)
                    unlogged = None
                # Export before saving: a run killed mid-export resumes before this step and exports it again.
                maybe_export(config, workdir, step, graphdef, ts.params, tokenizer)
                if save:
                    ckpt.save(step, _as_dict(ts), data_state, {"stage": index, "step": step}, signature,
                              val_loss=None if val_loss is None else val_loss["loss"])
                    unsaved = False
                if preemption.requested:
                    raise Interrupted("stop requested")
            bar.close()
            batches.close()  # its thread stops building this stage's batches
            params = ts.params
            data_state = None
    except Interrupted:
        if unsaved:  # the signal landed after a finished step (while waiting for data or validating)
            if pending is not None:  # its metrics are not read yet: check them before saving it
                finish_step(*pending)
            if unlogged is not None:  # its row, without the validation the signal cut short
                writer.write(step, unlogged)
            ckpt.save(step, _as_dict(ts), data_state, {"stage": index, "step": step}, signature)
        ckpt.wait()
        logging.warning("stopped by a signal at step %d; %s", step,
                        f"checkpoint of step {step} in {ckpt.directory}: rerun the same command to resume."
                        if step else "no step to save.")
        return summary
    finally:
        if batches is not None:
            batches.close()
        ckpt.close()
        if writer is not None:
            writer.close()
    summary.update(status="finished", step=step)
    if jax.process_index() == 0:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _as_dict(ts: TrainState) -> dict[str, Any]:
    return {"step": ts.step, "params": ts.params, "opt_state": ts.opt_state}


def evaluate(eval_step, params, config, split, tokenizer, stage, mesh, rules, tasks,
             concept_vectors=None) -> dict[str, float]:
    """Validation loss over a fixed set of batches (token-weighted), overall and per task."""
    sums, counts, total, tokens = np.zeros(len(tasks)), np.zeros(len(tasks)), 0.0, 0.0
    cos_sum, texts = 0.0, 0.0
    for batch in inputs.eval_batches(config, split, tokenizer, stage, concept_vectors):
        m = jax.device_get(eval_step(params, _place_batch(batch, mesh, rules)))
        sums += np.asarray(m["task_loss_sum"])
        counts += np.asarray(m["task_tokens"])
        total += float(m["loss"]) * float(m["target_tokens"])
        tokens += float(m["target_tokens"])
        if "embed_texts" in m:
            cos_sum += (1.0 - float(m["embed_loss"])) * float(m["embed_texts"])
            texts += float(m["embed_texts"])
    out = {"loss": total / max(tokens, 1.0)}
    out.update({t: float(sums[i] / counts[i]) for i, t in enumerate(tasks) if counts[i] > 0})
    if texts:
        out["embed_cos"] = cos_sum / texts
    return out
