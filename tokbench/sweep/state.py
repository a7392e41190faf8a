"""The sweep's own record beside Ray's experiment directory: MLflow run ids per trial,
what has been logged, each trial's latest test details. It is what makes resume and retries
end with exactly one MLflow run per trial."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

STATE_SUFFIX = ".tokbench.json"


def state_path(experiment_dir: Path) -> Path:
    """``<storage>/<sweep>.tokbench.json``, beside (not inside) Ray's experiment directory:
    Ray syncs its own staging copy of that directory over the storage copy, which would
    overwrite a file kept inside it."""
    experiment_dir = Path(experiment_dir)
    return experiment_dir.parent / f"{experiment_dir.name}{STATE_SUFFIX}"


class SweepState:
    """A small JSON document rewritten atomically on every change."""

    def __init__(self, directory: Path, doc: dict):
        self.path = state_path(directory)
        self.doc = doc
        self.doc.setdefault("trials", {})

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
        """Write atomically (temporary file, then rename)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}")
        tmp.write_text(json.dumps(self.doc, indent=1, sort_keys=True))
        tmp.replace(self.path)
