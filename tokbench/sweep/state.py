"""The sweep's own record beside Ray's experiment directory: MLflow run ids per trial,
what has been logged, each trial's latest test details. It is what makes resume and retries
end with exactly one MLflow run per trial."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tokbench.fileio import write_atomic

STATE_SUFFIX = ".tokbench.json"


def state_path(experiment_dir: Path) -> Path:
    """``<storage>/<sweep>.tokbench.json``, beside (not inside) Ray's experiment directory:
    Ray syncs its own staging copy of that directory over the storage copy, which would
    overwrite a file kept inside it."""
    experiment_dir = Path(experiment_dir)
    return experiment_dir.parent / f"{experiment_dir.name}{STATE_SUFFIX}"


class SweepState:
    """A JSON document rewritten atomically: at once with :meth:`save`, or at most every so
    often with :meth:`save_soon` (a thousand-trial state is megabytes: rewriting it on every
    reported epoch would make the driver the sweep's bottleneck)."""

    def __init__(self, directory: Path, doc: dict):
        self.path = state_path(directory)
        self.doc = doc
        self.doc.setdefault("trials", {})
        self._dirty = False
        self._saved_at = 0.0
        self._save_seconds = 0.0

    @classmethod
    def load(cls, directory: Path) -> "SweepState | None":
        """The state in ``directory``, or None when there is none."""
        path = state_path(directory)
        if not path.exists():
            return None
        return cls(directory, json.loads(path.read_text()))

    def trial(self, trial_id: str) -> dict:
        """The record of one trial (created empty on first use)."""
        return self.doc["trials"].setdefault(trial_id, {})

    def save(self) -> None:
        """Write atomically (temporary file, then rename) and durably (fsync first)."""
        started = time.monotonic()
        write_atomic(self.path, json.dumps(self.doc, indent=1, sort_keys=True))
        self._dirty = False
        self._saved_at = time.monotonic()
        self._save_seconds = self._saved_at - started

    def save_soon(self, interval: float = 0.5) -> bool:
        """Mark the state changed and save it when the last save is older than ``interval``
        seconds (and than 20 times its own duration, so saving stays under ~5% of the
        driver's time); True when it saved. Call :meth:`flush` at the end."""
        self._dirty = True
        if time.monotonic() - self._saved_at >= max(interval, 20 * self._save_seconds):
            self.save()
            return True
        return False

    @property
    def dirty(self) -> bool:
        """True when a change awaits a save."""
        return self._dirty

    def flush(self) -> None:
        """Save when anything changed since the last save."""
        if self._dirty:
            self.save()
