"""A wall-clock training budget for :class:`~meddiff3d.engine.DiffusionTrainer`, kept across resumes.

    trainer = DiffusionTrainer(net, objective, data, run_dir=run, max_iterations=10**9,
                               handlers=[WallClockBudget(minutes=30)])

After every optimiser step the handler adds the iteration's time (fetching and augmenting its batch, then the step)
to the run's training time and stops the engine
(``engine.terminate()``; the trainer then writes its final checkpoint) once the budget is used up. The training time
is saved as ``RUN_DIR/budget.json`` (``{"iteration", "seconds", "budget_seconds"}``) next to every checkpoint, so a
resumed run continues from the time the checkpoint was taken, not from zero: two runs "for the same wall-clock
budget" compare fairly however often either was interrupted. Time lost between the last checkpoint and a kill is
trained again and not counted twice. Time spent outside the iterations (data caching before ``run``, checkpoint
writing) is not counted.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from ignite.engine import Engine, Events

from meddiff3d.utils.io import save_json

logger = logging.getLogger("meddiff3d.engine")

BUDGET_FILE = "budget.json"


class WallClockBudget:
    """Stop training after ``minutes`` of iteration time in total over all (resumed) runs of one run folder."""

    def __init__(self, minutes: float) -> None:
        if not minutes > 0:
            raise ValueError(f"the wall-clock budget must be positive, got {minutes} minutes")
        self.budget_seconds = float(minutes) * 60.0
        self.seconds = 0.0  # training time so far, including earlier runs
        self._start: float | None = None
        self.exhausted = False

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        # an iteration's time runs from fetching its batch (ignite fetches before ITERATION_STARTED) to its step's end
        engine.add_event_handler(Events.GET_BATCH_STARTED, self._iteration_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self._save)

    def file(self, engine: Engine) -> Path:
        return Path(engine.run_dir) / BUDGET_FILE

    def _started(self, engine: Engine) -> None:
        self.seconds = 0.0
        path = self.file(engine)
        if engine.state.iteration > 0 and path.is_file():
            try:
                saved = json.loads(path.read_text())
                saved = {"iteration": int(saved["iteration"]), "seconds": float(saved["seconds"])}
            except (OSError, ValueError, TypeError, KeyError):  # damaged or edited: the budget counts from 0
                saved = {"iteration": None}
            if saved["iteration"] == engine.state.iteration:
                self.seconds = float(saved["seconds"])
            else:
                logger.warning("%s is for iteration %s, the checkpoint for %d: training time restarts at 0", path,
                               saved.get("iteration"), engine.state.iteration)
        self.exhausted = self.seconds >= self.budget_seconds
        if self.exhausted:
            logger.info("wall-clock budget of %.0f s already used (%.0f s): nothing to train", self.budget_seconds,
                        self.seconds)
            engine.terminate()

    def _iteration_started(self, engine: Engine) -> None:
        self._start = time.perf_counter()

    def _iteration_completed(self, engine: Engine) -> None:
        if self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self._start = None
        if engine.state.iteration % getattr(engine, "checkpoint_every", 1) == 0:
            self._save(engine)  # the trainer's own handler wrote the checkpoint just before (attached earlier)
        if self.seconds >= self.budget_seconds and not self.exhausted:
            self.exhausted = True
            logger.info("wall-clock budget of %.0f s used at iteration %d: stopping", self.budget_seconds,
                        engine.state.iteration)
            engine.terminate()

    def _save(self, engine: Engine) -> None:
        if getattr(getattr(engine, "dist", None), "is_main", True):
            save_json({"iteration": int(engine.state.iteration), "seconds": round(self.seconds, 3),
                       "budget_seconds": self.budget_seconds}, self.file(engine))
