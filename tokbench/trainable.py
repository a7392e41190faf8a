"""The Ray Tune trainable: a thin adapter over the annotation training loop.

``setup`` builds data (from the node's memory-mapped cache), tokenizer, model and loop from
the trial's config; ``step`` is one epoch; ``save_checkpoint`` / ``load_checkpoint`` carry the
full training state, so ASHA can stop a trial and Ray can retry it elsewhere from its last
checkpoint. The sweep file is expanded on the driver; the trial receives only
``{"combination", "seed", "params"}`` and composes its own config, so paths resolve on the
node that runs it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import ray
import torch
from ray import tune

from tokbench.sweep.spec import Sweep
from tokbench.training.run import build_runner

def _plain(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


class TokbenchTrainable(tune.Trainable):
    """One sweep trial: ``config`` = ``{"combination": int, "seed": int, "params": {key: value}}``."""

    def setup(self, config: dict, sweep: Sweep):
        # Ray sets OMP_NUM_THREADS from the trial's CPU request; torch must follow it.
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.cfg = sweep.trial_config(config)
        device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        self.runner = build_runner(self.cfg, Path(self.logdir) / "run", device=device)

    def step(self) -> dict:
        history = self.runner.history
        if history and history[-1]["should_stop"]:
            # Restored from the final checkpoint of a run that had already finished.
            return {**{k: _plain(v) for k, v in history[-1].items()}, "done": True}
        metrics = self.runner.step()
        if metrics["best_epoch"] == metrics["epoch"]:
            # Score the test split with the new best weights (never used for selection), so
            # every trial, also one the scheduler stops, ends with its best-weights test score.
            test = self.runner.evaluate_test()
            metrics.update({k: v for k, v in test.items() if k.startswith("test_") and np.isscalar(v)})
            # Results must stay scalar for Ray's loggers: the per-class details travel as JSON.
            metrics["test_details"] = json.dumps(
                {k: _plain(test[k]) for k in ("class_names", "test_confusion_matrix", "test_per_class_accuracy")}
            )
        metrics["done"] = bool(metrics["should_stop"])
        metrics["node_id"] = ray.get_runtime_context().get_node_id()
        return {k: _plain(v) for k, v in metrics.items()}

    def save_checkpoint(self, checkpoint_dir: str) -> None:
        self.runner.save_checkpoint(checkpoint_dir)

    def load_checkpoint(self, checkpoint_dir: str) -> None:
        self.runner.load_checkpoint(checkpoint_dir)
