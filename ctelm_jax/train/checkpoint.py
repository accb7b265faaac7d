"""One orbax CheckpointManager per run: train state, data-iterator state, curriculum position and model identity
as separate items; async saves; keeps the last K plus the best by validation loss; restores onto any mesh.

A save that fails for lack of space stops the run with a UserError naming the folder, the step and the newest
complete one. Orbax writes a step into a temporary folder (on gs://: the step folder, committed by its
`commit_success.txt`) that no restore takes for a step and the next start removes, so the earlier steps stay as
they were and a resume starts from the newest of them."""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import jax
import orbax.checkpoint as ocp
from flax import traverse_util
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from ctelm_jax import fs
from ctelm_jax.errors import MissingInput, UserError, is_disk_full

VAL_METRIC = "val_loss"


class CheckpointMismatch(ValueError):
    """The run directory holds checkpoints of a different model than the one configured."""


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
        """Raises CheckpointMismatch when the saved model identity differs from `expected`."""
        saved = self.restore_meta(step)[0]
        diff = {k: (saved.get(k), v) for k, v in expected.items() if saved.get(k) != v}
        if diff:
            lines = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
            raise CheckpointMismatch(
                f"{self.directory} holds checkpoints of a different model ({lines}); use a new --workdir, "
                "or set the config back to the model that wrote them.")

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
    one local device. Only the parameters are read (not the optimizer state)."""
    directory = fs.as_path(directory)
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add("state", ocp.args.PyTreeRestore)
    manager = ocp.CheckpointManager(directory, handler_registry=registry,
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    step = manager.latest_step() if step is None else step
    if step is None:
        raise MissingInput(f"{directory}: no complete checkpoint; train first or point at a run's checkpoints/.")
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
    params = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)))["state"]["params"]
    manager.close()
    return params, step
