"""The sweep's own record beside Ray's experiment directory: MLflow run ids per trial,
what has been logged, each trial's latest test details. It is what makes resume and retries
end with exactly one MLflow run per trial."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

STATE_FILE = "tokbench_sweep.json"


class SweepState:
    """A small JSON document rewritten atomically on every change."""

    def __init__(self, directory: Path, doc: dict):
        self.path = Path(directory) / STATE_FILE
        self.doc = doc
        self.doc.setdefault("trials", {})

    @classmethod
    def load(cls, directory: Path) -> "SweepState | None":
        """The state in ``directory``, or None when there is none."""
        path = Path(directory) / STATE_FILE
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
