"""The best evaluated model and the plateau: which step ``RUN_DIR/model`` holds, and when to stop.

After every evaluation :meth:`BestModel.update` compares the chosen metric with the best value so far
(lower or higher is better by :data:`~amid_pipeline.train.config.HIGHER_IS_BETTER`); a strictly better
value makes that step the best and resets the count of evaluations without one, which ``patience``
bounds (HF Trainer's ``load_best_model_at_end`` with early-stopping patience). Its state travels in
every checkpoint, so a resumed run compares against the same best and stops at the same step;
``RUN_DIR/best.json`` states the choice for the reader.

The model folder records which step it holds (:data:`KEPT`). A run killed after keeping a new best but
before its next checkpoint replays those steps on resume; on a CPU the replay is exact and keeps the same
step again, but on a GPU (nondeterministic kernels) the replayed evaluation may no longer win, and the folder
would hold weights of a step the resumed run did not choose: ``best.json`` then says so by name.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from amid_pipeline.shards.storage import write_json_atomic
from amid_pipeline.train.config import HIGHER_IS_BETTER

KEPT = "amid_pipeline_best.json"  # in RUN_DIR/model: the evaluated step whose weights the folder holds


@dataclasses.dataclass
class BestModel:
    metric: str
    patience: int = 0
    step: int | None = None  # the best evaluated step so far
    value: float | None = None
    evaluations: int = 0
    bad_evaluations: int = 0  # evaluations since the best one
    stopped: bool = False  # the plateau was reached: the run is over

    def update(self, step: int, metrics: dict[str, float]) -> bool:
        """Record the evaluation at ``step``; True when it is the new best (its weights should be kept).
        A non-finite value is never the best."""
        value = float(metrics[self.metric])
        self.evaluations += 1
        sign = -1.0 if HIGHER_IS_BETTER[self.metric] else 1.0
        better = math.isfinite(value) and (self.value is None or sign * value < sign * self.value)
        if better:
            self.step, self.value, self.bad_evaluations = step, value, 0
        else:
            self.bad_evaluations += 1
        self.stopped = bool(self.patience) and self.bad_evaluations >= self.patience
        return better

    def kept(self) -> dict[str, dict]:
        """The record saved inside the model folder with the weights of the new best step."""
        return {KEPT: {"metric": self.metric, "step": self.step, "value": self.value}}

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """The state of a checkpoint (None: one written without best-model tracking: nothing to restore). The
        metric and patience are the run's own: a resume under others is refused by its run record
        (:func:`amid_pipeline.train.checks.check_resumed_run`)."""
        for key, value in (state or {}).items():
            setattr(self, key, value)

    def write(self, path: Path, last_step: int, rows: str, model: Path) -> str | None:
        """``best.json``: the chosen step, its value, and why the run ended where it did; a warning
        (returned, and in the file) when ``model`` holds another step's weights (see the module docstring)."""
        direction = "highest" if HIGHER_IS_BETTER[self.metric] else "lowest"
        ended = (f"stopped at step {last_step}: {self.bad_evaluations} evaluations without a new best (patience "
                 f"{self.patience})" if self.stopped else f"ran to its last step, {last_step}")
        record = {"metric": self.metric, "step": self.step, "value": self.value, "evaluations": self.evaluations,
                  "stopped_early": self.stopped, "last_step": last_step,
                  "why": f"{direction} {self.metric} on {rows} over {self.evaluations} evaluations; {ended}"}
        held = json.loads((model / KEPT).read_text()) if (model / KEPT).exists() else None
        warning = None
        if held is not None and held["step"] != self.step:
            warning = (f"warning: {model} holds the weights of step {held['step']} ({self.metric} {held['value']}), kept "
                       f"before the run was killed; on resume that step's replay did not win again (nondeterministic "
                       f"kernels) and the best of this run, step {self.step}, was overwritten then")
            record.update(model_step=held["step"], model_value=held["value"], warning=warning)
        write_json_atomic(path, record)
        return warning
