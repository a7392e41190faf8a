"""What an MLflow run of tokbench holds: params, tags, per-epoch metrics, test results, artifacts."""

from __future__ import annotations

import csv
import shutil
import tempfile
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from tokbench.tracking.mlflow_runs import RunLogger, flatten
from tokbench.tokenizers.registry import PluginSource, plugin_source
from tokbench.training.experiment import config_hash, tokenizer_tags, user_modules
from tokbench.training.metrics import degenerate_splits, write_confusion_report

# Per-epoch keys that are bookkeeping, not metrics worth a chart.
_NOT_LOGGED = {"epoch", "should_stop"}


def run_tags(cfg: DictConfig) -> dict[str, str]:
    """Tags that identify a run in comparisons: tokenizer parts, dataset, split, seed."""
    split = cfg.split
    if split.kind == "random":
        split_name = "random"
    else:
        split_name = f"{split.kind}:{'+'.join(split.train) or 'train'}->{'+'.join(split.test) or 'test'}"
        # Where validation comes from when it is not carved from the training tissues.
        if split.kind == "cross_tissue" and (split.val or split.val_from == "test"):
            split_name += f",val={'+'.join(split.val or split.test)}"
    return {
        **tokenizer_tags(cfg),
        "method": cfg.method,
        "dataset": cfg.dataset.name or Path(cfg.dataset.path).stem,
        "split": split_name,
        "seed": str(cfg.seed),
        "config_hash": config_hash(cfg),
        **plugin_tags(cfg),
    }


def plugin_sources(cfg: DictConfig) -> list[PluginSource]:
    """The user modules a run uses whose code is not installed with Python (see
    :func:`tokbench.tokenizers.registry.plugin_source`)."""
    return [s for s in map(plugin_source, user_modules(cfg)) if s is not None]


def plugin_tags(cfg: DictConfig) -> dict[str, str]:
    """``plugin.<module>``: the sha256 of each user module's source the run used, so a
    result names the code that made it."""
    return {f"plugin.{s.module}": s.sha256 for s in plugin_sources(cfg)}


def log_plugin_sources(logger: RunLogger, sources: list[PluginSource]) -> None:
    """The source files of user modules, as artifacts under ``plugins/``."""
    if not sources:
        return
    with tempfile.TemporaryDirectory(prefix="tokbench-plugins-") as tmp:
        for source in sources:
            for name in source.files:
                target = Path(tmp) / name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source.path.parent / name, target)
        logger.log_artifacts(sorted(Path(tmp).iterdir()), "plugins")


def start_run(logger: RunLogger, cfg: DictConfig) -> None:
    """Log the flattened resolved config as params, the identifying tags, and the dataset as
    an MLflow dataset input (digest: the data cache key; context: the split)."""
    from tokbench.tracking.datasets import dataset_input

    logger.log_params(flatten(OmegaConf.to_container(cfg, resolve=True)))
    tags = run_tags(cfg)
    logger.set_tags(tags)
    logger.log_inputs([dataset_input(cfg, tags["split"])])
    log_plugin_sources(logger, plugin_sources(cfg))


def log_epoch(logger: RunLogger, metrics: dict) -> None:
    """One epoch's metrics at step = epoch."""
    logger.log_metrics({k: v for k, v in metrics.items() if k not in _NOT_LOGGED}, step=int(metrics["epoch"]))


def log_result(logger: RunLogger, cfg: DictConfig, result: dict, runner, run_dir: Path, history: list[dict]) -> list[str]:
    """Final test metrics and the artifacts: confusion matrix (PNG, CSV), per-class accuracy,
    resolved config, epoch history, and (``tracking.log_model``) the best weights.

    Tags the run ``degenerate``: the splits on which the model predicted a single class
    although the split holds several (``val`` of the best epoch, ``test``), joined by ``+``,
    or ``no``; returns those splits (see ``metrics.degenerate_splits``).
    """
    scalars = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    logger.log_metrics(scalars, step=int(result.get("best_epoch", 0)))
    out = run_dir / "artifacts"
    out.mkdir(parents=True, exist_ok=True)
    files = list(write_confusion_report(result, out).values())
    history_file = out / "history.csv"
    keys = sorted({k for row in history for k in row})
    with open(history_file, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)
    files += [history_file, run_dir / "config.yaml"]
    if cfg.tracking.log_model:
        model_file = out / "best_model.pt"
        torch.save(runner.model_state(), model_file)  # test() left the best weights loaded
        files.append(model_file)
    logger.log_artifacts(files)
    best = history[int(result["best_epoch"]) - 1] if result.get("best_epoch") else {}
    degenerate = degenerate_splits({**best, **result})
    logger.set_tags({"end_state": "completed", "epochs_run": len(history), "degenerate": "+".join(degenerate) or "no"})
    return degenerate
