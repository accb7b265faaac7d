"""The multi-task curriculum: named stages, each with its trainable groups, task weights, steps and schedule."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import optax

from ctelm_jax.errors import UserError
from ctelm_jax.train.optimizer import learning_rate_schedule


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage: train `trainable` groups on `tasks` (name -> weight) for `steps` steps."""

    name: str
    steps: int
    trainable: tuple[str, ...]
    tasks: tuple[tuple[str, float], ...]
    learning_rate: float
    warmup_steps: int = 0
    weight_decay: float = 0.0

    def schedule(self) -> optax.Schedule:
        """This stage's learning-rate schedule, counted from the stage's first step."""
        return learning_rate_schedule(self.learning_rate, self.warmup_steps, self.steps)

    @property
    def task_weights(self) -> dict[str, float]:
        """Task name -> sampling weight."""
        return dict(self.tasks)


class Curriculum:
    """Stages in order; maps a global step to its stage."""

    def __init__(self, stages: Sequence[Mapping[str, Any]], known_tasks: Sequence[str]):
        if not stages:
            raise UserError("config.stages is empty; a run needs at least one stage.")
        self.stages = []
        for s in stages:
            tasks = tuple((str(k), float(v)) for k, v in dict(s["tasks"]).items() if float(v) > 0)
            unknown = {t for t, _ in tasks} - set(known_tasks)
            if unknown or not tasks:
                raise UserError(f"stage {s['name']!r}: tasks {sorted(unknown) or '(none)'} not among {list(known_tasks)}.")
            if int(s["steps"]) <= 0:
                raise UserError(f"stage {s['name']!r}: steps={s['steps']}; a stage runs a positive number of steps "
                                "(set its steps, or drop the stage from config.stages).")
            if not float(s["learning_rate"]) > 0:
                raise UserError(f"stage {s['name']!r}: learning_rate={s['learning_rate']}; set a positive learning "
                                "rate (e.g. 1e-3 for the adapter, 3e-4 with LoRA).")
            self.stages.append(Stage(
                name=str(s["name"]), steps=int(s["steps"]), trainable=tuple(s["trainable"]), tasks=tasks,
                learning_rate=float(s["learning_rate"]), warmup_steps=int(s.get("warmup_steps", 0)),
                weight_decay=float(s.get("weight_decay", 0.0))))

    @property
    def total_steps(self) -> int:
        """Steps of all stages together."""
        return sum(s.steps for s in self.stages)

    def bounds(self, index: int) -> tuple[int, int]:
        """[first, end) global steps of stage `index`."""
        start = sum(s.steps for s in self.stages[:index])
        return start, start + self.stages[index].steps

    def stage_at(self, step: int) -> int:
        """Index of the stage that runs global step `step` (the last stage once finished)."""
        for i in range(len(self.stages)):
            if step < self.bounds(i)[1]:
                return i
        return len(self.stages) - 1
