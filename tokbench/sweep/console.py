"""What a running sweep prints: one compact table a person can follow, instead of Ray's
per-trial result boxes.

Every ``interval`` seconds (and when the sweep ends) :class:`ConsoleProgress` prints::

    sweep demo: 7 of 18 trials ended (2 stopped by ASHA, 0 failed), 4 running; 3m12s elapsed, at most ~5m40s left
      tokenizer                                 seed  epoch  val MCC  state
      learned/zero/geneformer                      0    4/8    0.812  running
      ...

``at most``: the estimate assumes every trial still to end runs all its epochs at the
sweep's pace so far; ASHA stops some, so the sweep usually ends sooner.
"""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO

from ray import tune

from tokbench.sweep.spec import Sweep

RUNNING, DONE, STOPPED, FAILED, PENDING = "running", "done", "stopped by ASHA", "failed", "pending"
_NAME_WIDTH = 40


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


class ConsoleProgress(tune.Callback):
    """Tracks each trial's tokenizer, seed, epoch, last validation MCC and state, and prints
    the table to ``stream`` at most every ``interval`` seconds (rows: the running trials and
    the ``recent`` last ended ones; every trial when the sweep has ``all_rows`` or fewer)."""

    def __init__(self, sweep: Sweep, interval: float = 30.0, stream: TextIO | None = None,
                 recent: int = 8, all_rows: int = 24):
        self.sweep, self.interval, self.recent, self.all_rows = sweep, float(interval), recent, all_rows
        self.stream = stream
        self.n_trials = sweep.n_trials()
        self.max_epochs = int(sweep.spec.max_epochs or 0)
        self.rows: dict[str, dict] = {}
        self.ended: list[str] = []
        self.started = time.monotonic()
        self.printed = self.started

    def __getstate__(self) -> dict:
        # Ray pickles the run config on resume: keep the settings, not the stream or the table.
        return {"sweep": self.sweep, "interval": self.interval, "recent": self.recent, "all_rows": self.all_rows}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def _row(self, trial) -> dict:
        if trial.trial_id not in self.rows:
            config = trial.config or {}
            combination = self.sweep.combinations[int(config.get("combination", 0))]
            self.rows[trial.trial_id] = {"label": combination["label"], "seed": config.get("seed", "-"),
                                         "epoch": 0, "val_mcc": math.nan, "state": PENDING}
        return self.rows[trial.trial_id]

    def on_trial_start(self, iteration, trials, trial, **info):
        self._row(trial)["state"] = RUNNING

    def on_trial_result(self, iteration, trials, trial, result, **info):
        row = self._row(trial)
        row["state"] = RUNNING
        row["epoch"] = int(result.get("epoch", row["epoch"]))
        row["val_mcc"] = float(result.get("val_mcc", math.nan))

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        # Ray marks every finished trial done; only the loop's own flag tells a trial that ran
        # to its end from one the scheduler cut short (as the MLflow callback does).
        self._end(trial, DONE if last.get("should_stop") else STOPPED)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trial, FAILED)

    def _end(self, trial, state: str) -> None:
        self._row(trial)["state"] = state
        if trial.trial_id in self.ended:
            self.ended.remove(trial.trial_id)
        self.ended.append(trial.trial_id)

    def on_step_end(self, iteration, trials, **info):
        if time.monotonic() - self.printed >= self.interval:
            self.print()

    def on_experiment_end(self, trials, **info):
        self.print()

    def table(self) -> str:
        """The summary line and the rows, as printed."""
        states = [r["state"] for r in self.rows.values()]
        ended = sum(s in (DONE, STOPPED, FAILED) for s in states)
        elapsed = time.monotonic() - self.started
        line = (f"sweep {self.sweep.spec.name}: {ended} of {self.n_trials} trials ended "
                f"({states.count(STOPPED)} stopped by ASHA, {states.count(FAILED)} failed), "
                f"{states.count(RUNNING)} running; {_duration(elapsed)} elapsed")
        epochs_done = sum(r["epoch"] for r in self.rows.values())
        if ended < self.n_trials and epochs_done and self.max_epochs:
            # epochs still to run at most: every trial not ended runs to max_epochs
            still = sum(self.max_epochs - r["epoch"] for r in self.rows.values() if r["state"] in (RUNNING, PENDING))
            still += self.max_epochs * (self.n_trials - len(self.rows))
            line += f", at most ~{_duration(elapsed / epochs_done * still)} left"
        lines = [line, f"  {'tokenizer':<{_NAME_WIDTH}}  {'seed':>4}  {'epoch':>5}  {'val MCC':>7}  state"]
        if len(self.rows) <= self.all_rows:
            shown = list(self.rows)
        else:
            shown = [t for t, r in self.rows.items() if r["state"] == RUNNING] + self.ended[-self.recent:]
        for trial_id in shown:
            r = self.rows[trial_id]
            epoch = f"{r['epoch']}/{self.max_epochs}" if self.max_epochs else str(r["epoch"])
            mcc = "-" if math.isnan(r["val_mcc"]) else f"{r['val_mcc']:.3f}"
            lines.append(f"  {_short(r['label'], _NAME_WIDTH):<{_NAME_WIDTH}}  {r['seed']!s:>4}  {epoch:>5}  "
                         f"{mcc:>7}  {r['state']}")
        return "\n".join(lines)

    def print(self) -> None:
        stream = self.stream or sys.stdout
        print(self.table(), file=stream, flush=True)
        self.printed = time.monotonic()
