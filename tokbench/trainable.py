"""The Ray Tune trainable: a thin adapter over the annotation training loop.

``setup`` builds data (from the node's memory-mapped cache), tokenizer, model and loop from
the trial's config; ``step`` is one epoch; ``save_checkpoint`` / ``load_checkpoint`` carry the
full training state, so ASHA can stop a trial and Ray can retry it elsewhere from its last
checkpoint. ``reset_config`` lets the sweep reuse a finished trial's worker process for the
next trial (``TuneConfig(reuse_actors=True)``): a new process would pay for starting Python
and importing torch and tokbench again, several seconds per trial on a small machine. The
sweep file is expanded on the driver; the trial receives only ``{"combination", "seed",
"params"}`` and composes its own config, so paths resolve on the node that runs it.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import time
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
        # Ray's storage layer logs every checkpoint at INFO, eight lines per trial in the
        # driver's output; MLflow and the leaderboard say what a user needs.
        logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
        self.sweep = sweep
        self._build(config)

    def reset_config(self, new_config: dict) -> bool:
        """Take the next trial in this worker process (Ray calls it when reusing actors)."""
        self._build(new_config)
        return True

    def _build(self, config: dict) -> None:
        started = time.perf_counter()
        # Ray sets OMP_NUM_THREADS from the trial's CPU request; torch must follow it.
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.cfg = self.sweep.trial_config(config)
        device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        # A reused worker drops the previous trial's model and data before building the next.
        self.runner = None
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        self.runner = build_runner(self.cfg, Path(self.logdir) / "run", device=device)
        # Reported with the first result: data, tokenizer and model set-up of this trial.
        self._setup_seconds = time.perf_counter() - started

    def step(self) -> dict:
        history = self.runner.history
        if history and history[-1]["should_stop"]:
            # Restored from the final checkpoint of a run that had already finished.
            return {**{k: _plain(v) for k, v in history[-1].items()}, "done": True}
        metrics = self.runner.step()
        if metrics["best_epoch"] == metrics["epoch"]:
            # Score the test split with the new best weights (never used for selection), so
            # every trial, also one the scheduler stops, ends with its best-weights test score.
            started = time.perf_counter()
            test = self.runner.evaluate_test()
            metrics["eval_test_seconds"] = time.perf_counter() - started
            metrics.update({k: v for k, v in test.items() if k.startswith("test_") and np.isscalar(v)})
            # Results must stay scalar for Ray's loggers: the per-class details travel as JSON.
            metrics["test_details"] = json.dumps(
                {k: _plain(test[k]) for k in ("class_names", "test_confusion_matrix", "test_per_class_accuracy")}
            )
        if self._setup_seconds is not None:
            metrics["setup_seconds"], self._setup_seconds = self._setup_seconds, None
        metrics["done"] = bool(metrics["should_stop"])
        metrics["node_id"] = ray.get_runtime_context().get_node_id()
        return {k: _plain(v) for k, v in metrics.items()}

    def save_checkpoint(self, checkpoint_dir: str) -> None:
        self.runner.save_checkpoint(checkpoint_dir)

    def load_checkpoint(self, checkpoint_dir: str) -> None:
        self.runner.load_checkpoint(checkpoint_dir)
