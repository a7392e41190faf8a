"""``tokbench train``: one experiment end to end, with a progress bar, recorded in MLflow."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from tokbench.errors import TokbenchError
from tokbench.tracking.mlflow_runs import RunLogger, resolve_tracking_uri
from tokbench.tracking.record import log_epoch, log_result, run_tags, start_run
from tokbench.training.experiment import check_resume, experiment_path, load_experiment, run_directory
from tokbench.training.metrics import degenerate_splits, predicted_class_names
from tokbench.training.run import build_runner

log = logging.getLogger("tokbench")

RUN_ID_FILE = "mlflow_run_id"


def degenerate_warning(splits: list[str], runner, best: dict, result: dict) -> str:
    """One line naming each split where the best weights predicted a single class, that
    class, and how many the split holds."""
    parts = []
    for split in splits:
        if split == "test":
            confusion, true = result["test_confusion_matrix"], result["test_true_classes"]
        else:  # the epoch history keeps counts only; test() left the best weights loaded
            confusion, true = runner.evaluate_split(split)["confusion_matrix"], best[f"{split}_true_classes"]
        names = predicted_class_names(confusion, result["class_names"])
        parts.append(f"{split} (every cell called {names[0]!r} of {true} cell types present)" if names else split)
    return (
        f"degenerate model: a single class predicted on {' and '.join(parts)}; its scores measure no learning. "
        f"Train longer (trainer.max_epochs, trainer.min_epochs), check optimizer.lr and the class balance"
    )


class ProgressBar:
    """The cells-per-epoch bar of ``tokbench train``, drawn from the first batch on.

    Created lazily: a tqdm bar draws itself when made, so one made before the data and the
    tokenizer are checked would leave an empty ``0cell [00:00, ?cell/s]`` line above the
    error of a run that never started.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._bar: tqdm | None = None

    def update(self, done: int, total: int, rate: float) -> None:
        """Show ``done`` of ``total`` cells of this epoch at ``rate`` cells per second."""
        if not self.enabled:
            return
        if self._bar is None:
            self._bar = tqdm(total=total, unit="cell", dynamic_ncols=True, leave=False)
        elif self._bar.total != total:
            self._bar.reset(total=total)
        self._bar.n = done
        self._bar.set_postfix_str(f"{rate:,.0f} cells/s", refresh=False)
        self._bar.refresh()

    def write(self, line: str) -> None:
        """Print ``line`` above the bar (or alone, before the first batch or without a bar)."""
        if self._bar is None:
            print(line)
        else:
            self._bar.write(line)

    def close(self) -> None:
        """Clear the bar from the terminal; a later batch draws a new one."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def train(experiment: str, overrides: Sequence[str] = (), *, resume: str | None = None, progress: bool = True) -> dict:
    """Run one experiment; return its test result. Errors in the config, data or tracking
    URI surface as :class:`TokbenchError` before any training."""
    cfg = load_experiment(experiment_path(experiment), overrides)
    if resume:
        run_dir = Path(resume).resolve()
        check_resume(run_dir, cfg)
    else:
        run_dir = run_directory(cfg)
        if (run_dir / "config.yaml").exists():
            raise TokbenchError(f"run_dir {run_dir} holds a run already; resume it with --resume {run_dir} or pick another run_dir")
    uri = resolve_tracking_uri(cfg.tracking.uri) if cfg.tracking.enabled else None
    logger = None
    if uri:
        previous = run_dir / RUN_ID_FILE
        if resume and previous.exists():
            logger = RunLogger(uri, cfg.tracking.experiment, run_id=previous.read_text().strip())
        else:
            logger = RunLogger(uri, cfg.tracking.experiment, run_name=cfg.tracking.run_name or run_tags(cfg)["tokenizer"])
    with logger if logger else nullcontext():
        if logger:
            start_run(logger, cfg)
        bar = ProgressBar(enabled=progress)
        runner = build_runner(cfg, run_dir, on_batch=bar.update)
        if logger:
            run_dir.joinpath(RUN_ID_FILE).write_text(logger.run_id)
        if resume and (run_dir / "trainer.pt").exists():
            runner.load_checkpoint()
            log.info("resumed %s after epoch %d", run_dir, runner.epoch)

        def on_epoch(metrics: dict) -> None:
            runner.save_checkpoint()
            if logger:
                log_epoch(logger, metrics)
            bar.write(
                f"epoch {metrics['epoch']:>3}  loss {metrics['train_loss']:.4f}  val acc {metrics['val_accuracy']:.3f}  "
                f"val F1 {metrics['val_macro_f1']:.3f}  val MCC {metrics['val_mcc']:.3f}  "
                f"{metrics['cells_per_second']:,.0f} cells/s  {metrics['epoch_seconds']:.1f} s"
                + (f"  C {metrics['C']:g} (cv {cfg.baseline.track_metric} {metrics['cv_' + cfg.baseline.track_metric]:.3f})"
                   if "C" in metrics else "")
            )

        try:
            history = runner.fit(on_epoch=on_epoch)
        finally:
            bar.close()
        result = runner.test()
        best = history[result["best_epoch"] - 1]
        degenerate = degenerate_splits({**best, **result})
        if logger:
            log_result(logger, cfg, result, runner, run_dir, history)
    print(
        f"test  accuracy {result['test_accuracy']:.4f}  macro-F1 {result['test_macro_f1']:.4f}  "
        f"MCC {result['test_mcc']:.4f}  (best epoch {result['best_epoch']} of {len(history)})"
    )
    if degenerate:
        log.warning(degenerate_warning(degenerate, runner, best, result))
    print(f"run   {run_dir}")
    if uri:
        print(f"mlflow run {logger.run_id} in {uri}  (mlflow ui --backend-store-uri {uri})")
    return result
