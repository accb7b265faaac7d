"""One orbax CheckpointManager per run: train state, data-iterator state, curriculum position and model identity
as separate items; async saves; keeps the last K plus the best by validation loss; restores onto any mesh.

A save that fails for lack of space stops the run with a UserError naming the folder, the step and the newest
complete one. Orbax writes a step into a temporary folder (on gs://: the step folder, committed by its
`commit_success.txt`) that no restore takes for a step and the next start removes, so the earlier steps stay as
they were and a resume starts from the newest of them.

A step that cannot be read (a file missing or truncated, a garbled JSON item or tensorstore file) is a
DamagedCheckpoint: `read_step` turns any error of reading it into one, `newest_readable` tries the steps newest-first.
Training resumes from the newest readable step, moving each newer damaged one aside with a warning (never a restart
from step 0); `restore_params` stops naming the damaged step and the readable one to pass as a step, unless given one."""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, Callable, Iterator, TypeVar

import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from flax import traverse_util
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from ctelm_jax import fs
from ctelm_jax.errors import MissingInput, UserError, is_disk_full

VAL_METRIC = "val_loss"
DAMAGED_DIR = "damaged_checkpoints"  # beside the checkpoint folder: the damaged steps a resume moved aside

T = TypeVar("T")


class CheckpointMismatch(UserError):
    """The run directory holds checkpoints of a different model than the one configured."""


class DamagedCheckpoint(UserError):
    """A checkpoint step that cannot be read (a file missing, truncated or garbled); `step` and `reason` say which/why."""

    def __init__(self, directory: Any, step: int, reason: str):
        super().__init__(f"checkpoint step {step} in {directory} is damaged: {reason}")
        self.step, self.reason = step, reason


def read_step(directory: Any, step: int, read: Callable[[int], T]) -> T:
    """`read(step)`, with any error of reading a damaged step raised as a DamagedCheckpoint (orbax wraps tensorstore's
    in a bare Exception; JSON, a missing file or key); a CheckpointMismatch or other UserError passes unchanged."""
    try:
        return read(step)
    except UserError:  # a CheckpointMismatch too
        raise
    except Exception as e:
        root = e
        while root.__cause__ is not None:  # the innermost error says what is wrong with the files
            root = root.__cause__
        reason = (str(root).strip().splitlines() or [""])[0][:300]
        raise DamagedCheckpoint(directory, step, f"{type(root).__name__}: {reason}") from e


def newest_readable(directory: Any, steps: list[int], read: Callable[[int], T]
                    ) -> tuple[int | None, T | None, list[DamagedCheckpoint]]:
    """The newest of `steps` that `read` reads, its value and the damaged newer ones; (None, None, all) when none
    reads."""
    damaged = []
    for step in sorted(steps, reverse=True):
        try:
            return step, read_step(directory, step, read), damaged
        except DamagedCheckpoint as e:
            damaged.append(e)
    return None, None, damaged


def move_away_hint(directory: Any, damaged: list[DamagedCheckpoint]) -> str:
    """The fix for damaged steps: move their folders out of the checkpoint folder."""
    names = " ".join(str(fs.as_path(directory) / str(d.step)) for d in damaged)
    return f"move the damaged step folder(s) out of {directory} (e.g. mv {names} /tmp/) and rerun"


class Checkpointer:
    """Saves and restores {state, data, progress, meta} under `<workdir>/checkpoints/<step>/`."""

    def __init__(self, directory: str | os.PathLike, keep: int = 3, keep_best: int = 1, async_save: bool = True):
        self.directory = fs.as_path(directory)
        policy = pp.AnyPreservationPolicy([
            pp.LatestN(keep),
            pp.BestN(get_metric_fn=lambda m: m[VAL_METRIC], reverse=False, n=keep_best,
                     keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy, enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", "progress", "meta"))
        self._started: list[int] = []  # the steps this instance began saving

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, if any."""
        return self.manager.latest_step()

    def resume(self, read: Callable[[int], T]) -> tuple[int | None, T | None]:
        """(step, read(step)) of the newest readable checkpoint, (None, None) when there is none. Newer damaged steps
        are moved to `<workdir>/damaged_checkpoints/` with a warning naming each and why; a UserError when none reads."""
        steps = list(self.manager.all_steps())
        step, value, damaged = newest_readable(self.directory, steps, read)
        if steps and step is None:
            errors = "; ".join(f"step {d.step}: {d.reason}" for d in damaged)
            raise UserError(f"no checkpoint in {self.directory} can be read ({errors}); "
                            f"{move_away_hint(self.directory, damaged)} to start over from step 0.")
        for d in damaged:  # moved out of the manager's folder, so that the resumed run can save those steps again
            aside = self.directory.parent / DAMAGED_DIR / str(d.step)
            if jax.process_index() == 0:
                aside.parent.mkdir(parents=True, exist_ok=True)
                if aside.exists():
                    aside = aside.with_name(f"{d.step}.{len(list(aside.parent.iterdir()))}")
                (self.directory / str(d.step)).rename(aside)
            logging.warning("%s; moved it to %s and resuming from step %d", d, aside, step)
        if damaged:
            if jax.process_count() > 1:
                multihost_utils.sync_global_devices("damaged checkpoints moved aside")
            self.manager.reload()
        return step, value

    def save(self, step: int, state: Any, data_state: Any, progress: dict, meta: dict,
             val_loss: float | None = None, force: bool = True) -> None:
        """Starts an (async) save; the step directory appears only once it is complete."""
        metrics = {VAL_METRIC: float(val_loss)} if val_loss is not None else None
        self._started.append(step)
        with self._stopping_on_full_disk():
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                progress=ocp.args.JsonSave(progress), meta=ocp.args.JsonSave(meta)), metrics=metrics, force=force)

    @contextlib.contextmanager
    def _stopping_on_full_disk(self) -> Iterator[None]:
        """Turns a save that failed for lack of space (here, or an earlier async one surfacing here) into a UserError
        naming the folder, the unfinished step and the newest complete one."""
        try:
            yield
        except Exception as e:
            if not is_disk_full(e):
                raise
            self.manager.reload()
            complete = self.manager.all_steps()
            failed = [s for s in self._started if s not in complete] or self._started[-1:]
            newest = f"step {max(complete)}" if complete else "none yet"
            raise UserError(
                f"saving checkpoint step {failed[0]} in {self.directory} failed: no space left on its disk ({e}). The "
                f"earlier checkpoints are intact (newest complete: {newest}) and the unfinished one is never restored "
                "(the next start removes it). Free space there (or keep fewer: --config.checkpoint.keep) and rerun "
                "the same command to resume.") from e

    def restore_meta(self, step: int) -> tuple[dict, dict, Any]:
        """(meta, progress, data_state) of a checkpoint: the small JSON items."""
        out = self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore(), progress=ocp.args.JsonRestore(), data=ocp.args.JsonRestore()))
        return out["meta"], out["progress"], out["data"]

    def restore_state(self, step: int, abstract_state: Any) -> Any:
        """The train state, placed by the shardings of `abstract_state` (ShapeDtypeStructs), whatever mesh saved it."""
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        return out["state"]

    def check_meta(self, step: int, expected: dict) -> None:
        """Raises CheckpointMismatch when the saved model identity differs from `expected` (a key either side lacks
        differs too: a k = 3 checkpoint is not the k = 1 model whose signature omits k)."""
        saved = self.restore_meta(step)[0]
        diff = {k: (saved.get(k), expected.get(k)) for k in sorted(expected.keys() | saved.keys())
                if saved.get(k) != expected.get(k)}
        if diff:
            lines = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
            raise CheckpointMismatch(
                f"--workdir={self.directory.parent} holds checkpoints of a different model ({lines}); pass a new "
                "--workdir, or set the config back to the model that wrote them.")

    def wait(self) -> None:
        """Blocks until pending async saves are complete."""
        with self._stopping_on_full_disk():
            self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for saves and releases the manager (also when a save failed)."""
        try:
            self.wait()
        finally:
            self.manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs with the given shardings, the restore target of `tree`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def restore_params(directory: str | os.PathLike, template: dict, step: int | None = None) -> tuple[dict, int]:
    """The parameters of a run's checkpoint (latest unless `step`), shaped like `template` (a pure param dict): a
    ShapeDtypeStruct leaf with a sharding is read straight onto it, whatever topology wrote it, any other leaf onto
    one local device. Only the parameters are read (not the optimizer state). A damaged latest step stops with a
    DamagedCheckpoint naming it and the newest readable step, never falling back unasked."""
    directory = fs.as_path(directory)
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add("state", ocp.args.PyTreeRestore)
    for item in ("data", "progress", "meta"):  # known, so that orbax does not warn it cannot restore them
        registry.add(item, ocp.args.JsonRestore)
    manager = ocp.CheckpointManager(directory, handler_registry=registry,
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    steps = list(manager.all_steps())
    if not steps:
        raise MissingInput(f"{directory}: no complete checkpoint; train first or point at a run's checkpoints/.")
    if step is not None and step not in steps:
        raise MissingInput(f"{directory}: no checkpoint of step {step}; the complete ones are steps {sorted(steps)}.")
    read = functools.partial(_read_params, manager, directory, template)
    try:
        if step is not None:
            return read_step(directory, step, read), step
        good, params, damaged = newest_readable(directory, steps, read)
    finally:
        manager.close()
    if damaged:
        newest = damaged[0]
        choice = (f"step {good} reads fine: pass --step {good} (step={good}) to use it, or "
                  if good is not None else "no step reads; ")
        raise DamagedCheckpoint(directory, newest.step,
                                f"{newest.reason}. {choice}{move_away_hint(directory, damaged)}.")
    return params, good


def _read_params(manager: ocp.CheckpointManager, directory: Any, template: dict, step: int) -> dict:
    """The parameters of checkpoint `step`, shaped like `template`; a CheckpointMismatch when they differ."""
    saved = {tuple(str(p) for p in k): v.shape for k, v in
             traverse_util.flatten_dict(manager.item_metadata(step)["state"].tree["params"]).items()}
    single = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = {}
    for key, leaf in traverse_util.flatten_dict(template).items():
        skey = tuple(str(p) for p in key)
        name = "/".join(skey)
        if skey not in saved:
            raise CheckpointMismatch(
                f"{directory} step {step}: parameter {name} is missing; the checkpoint was written for another model "
                "or by an older ctelm_jax (before the adapter's input statistics were saved with it). Use the code "
                "and config that wrote it, or train a new run in a fresh workdir.")
        if tuple(saved[skey]) != tuple(leaf.shape):
            raise CheckpointMismatch(
                f"{directory} step {step}: parameter {name} has shape {tuple(saved[skey])} but the configured "
                f"model's is {tuple(leaf.shape)}; the config does not describe the model this checkpoint holds.")
        target[key] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=getattr(leaf, "sharding", None) or single)
    target = {"params": traverse_util.unflatten_dict(target)}
    return manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)))["state"]["params"]
