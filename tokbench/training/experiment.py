"""An experiment: one typed config composing data, tokenizer, model and training.

An experiment file is YAML with the sections of :class:`ExperimentConfig`. A tokenizer
part may be a preset name (``fc: uce``) or a mapping that starts from one
(``fc: {preset: uce, select: {size: 512}}``). Command-line overrides are dotted
(``model.d_model=256 optimizer.lr=1e-3``); ``fg=NAME`` / ``fe=NAME`` / ``fc=NAME``
replace a part by a preset. Everything is checked against the schema before any data
loads: a misspelt key or a wrong type names its path.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tokbench.data.atlas import register_resolvers
from tokbench.data.config import DatasetConfig, SplitConfig
from tokbench.errors import TokbenchError
from tokbench.model.config import ModelConfig, check_choice, validate_model_config
from tokbench.tokenizers.config import FcConfig, FeConfig, FgConfig, load_component, resolve_params, to_config
from tokbench.training.config import (
    BaselineConfig,
    OptimizerConfig,
    SchedulerConfig,
    TrainerConfig,
    validate_baseline_config,
    validate_optimizer_config,
    validate_scheduler_config,
    validate_trainer_config,
)

METHODS = ("transformer", "logreg")
TOKENIZER_PARTS = ("fg", "fe", "fc")


@dataclass
class TrackingConfig:
    """Where runs are recorded. ``uri`` empty = ``$MLFLOW_TRACKING_URI``, else
    ``sqlite:///<cwd>/mlflow.db``."""

    enabled: bool = True
    uri: str = ""
    experiment: str = "tokbench"
    run_name: str = ""
    log_model: bool = True


@dataclass
class ExperimentConfig:
    """Everything one run needs. ``method``: ``transformer`` (a tokenizer + transformer) or
    ``logreg`` (the logistic-regression baseline on normalised expression). ``seed`` seeds
    model initialisation, batch order, dropout and every tokenizer random choice (the data
    split has its own ``split.seed``). ``run_dir`` empty = a new directory under ``runs/``.
    ``gene_embeddings`` is the gene-vector file ``fg=pretrained`` reads when ``fg.path`` is
    not set, so a sweep can switch Fg by preset name alone."""

    name: str = "experiment"
    method: str = "transformer"
    seed: int = 0
    run_dir: str = ""
    gene_embeddings: Optional[str] = None
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    fg: FgConfig = field(default_factory=FgConfig)
    fe: FeConfig = field(default_factory=FeConfig)
    fc: FcConfig = field(default_factory=FcConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def builtin_experiment(name: str) -> Path:
    """Path of an experiment file shipped in ``tokbench/configs/experiments/``."""
    from importlib import resources

    folder = resources.files("tokbench") / "configs" / "experiments"
    path = Path(str(folder / f"{name}.yaml"))
    if not path.exists():
        names = sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))
        raise TokbenchError(f"no built-in experiment {name!r}; built-in: {', '.join(names)}")
    return path


def experiment_path(name_or_path: str) -> Path:
    """A file path, or the name of a built-in experiment (``cross_tissue``)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    return builtin_experiment(name_or_path)


def _schema_error(err: OmegaConfBaseException, where: str) -> TokbenchError:
    key = getattr(err, "full_key", None) or "?"
    message = str(err).splitlines()[0]
    return TokbenchError(f"{where}: {key}: {message}")


def _expand_part(part: str, value: Any, where: str) -> Any:
    """A tokenizer part given as a preset name or ``{preset: NAME, ...}`` → full mapping."""
    if isinstance(value, str):
        return load_component(part, value)
    if isinstance(value, dict) and "preset" in value:
        rest = {k: v for k, v in value.items() if k != "preset"}
        try:
            return OmegaConf.merge(load_component(part, value["preset"]), rest)
        except OmegaConfBaseException as err:
            raise _schema_error(err, f"{where}: {part}") from None
    return value


def read_yaml_mapping(path: Path) -> dict:
    """The top-level mapping of a YAML file; clear errors for a missing or malformed file."""
    if not path.exists():
        raise TokbenchError(f"{path}: no such file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise TokbenchError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise TokbenchError(f"{path}: expected a mapping of sections at the top level")
    return raw


def compose(base: dict, overrides: Sequence[str] = (), where: str = "config") -> DictConfig:
    """Merge ``base`` (a plain mapping) and ``overrides`` into the typed schema; unresolved."""
    register_resolvers()
    raw = {k: _expand_part(k, v, where) if k in TOKENIZER_PARTS else v for k, v in base.items()}
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(ExperimentConfig), raw)
    except OmegaConfBaseException as err:
        raise _schema_error(err, where) from None
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise TokbenchError(f"override {item!r}: expected KEY=VALUE, e.g. model.d_model=256 or fc=uce")
        try:
            if key in TOKENIZER_PARTS and "." not in value and not value.startswith("{"):
                cfg[key] = load_component(key, value)
            else:
                cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as err:
            raise _schema_error(err, f"override {item!r}") from None
    return cfg


def load_experiment(path: str | Path | None, overrides: Sequence[str] = ()) -> DictConfig:
    """Read an experiment file (or only the defaults, for None), apply overrides, resolve
    interpolations, make paths absolute and validate every section. Nothing is loaded."""
    where = str(path) if path else "config"
    base = read_yaml_mapping(Path(path)) if path else {}
    cfg = compose(base, overrides, where)
    return finalize(cfg, where)


def finalize(cfg: DictConfig, where: str = "config") -> DictConfig:
    """Resolve interpolations, make file paths absolute, validate; return a resolved copy."""
    if cfg.fg.name == "pretrained" and not OmegaConf.select(cfg, "fg.path", default=None) and cfg.gene_embeddings:
        cfg = cfg.copy()
        cfg.fg.path = cfg.gene_embeddings
    try:
        container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", "") or "?"
        if "Missing mandatory value" in str(err):
            raise TokbenchError(f"{where}: {key}: missing required value") from None
        raise _schema_error(err, where) from None
    resolved = OmegaConf.merge(OmegaConf.structured(ExperimentConfig), container)
    for section, key in (("dataset", "path"), ("dataset", "cache_dir"), ("fg", "path"), ("fg", "gene_list"),
                         ("", "run_dir"), ("", "gene_embeddings")):
        holder = resolved[section] if section else resolved
        if holder[key]:
            holder[key] = str(Path(holder[key]).expanduser().resolve())
    validate(resolved, where)
    return resolved


def validate(cfg: DictConfig, where: str = "config") -> None:
    """Check every section's values (ranges, names, component parameters)."""
    check_choice(cfg.method, METHODS, "method")
    validate_model_config(cfg.model)
    validate_optimizer_config(cfg.optimizer)
    validate_scheduler_config(cfg.scheduler)
    validate_trainer_config(cfg.trainer)
    validate_baseline_config(cfg.baseline)
    resolve_params("fg", to_config("fg", cfg.fg), "fg")
    resolve_params("fe", to_config("fe", cfg.fe), "fe")
    fc = to_config("fc", cfg.fc)
    for sub in ("order", "select", "combine"):
        resolve_params(sub, fc[sub], f"fc.{sub}")


# Sections that do not change what a run computes: where it is logged or stored.
_NOT_HASHED = ("tracking", "run_dir", "name")


def config_hash(cfg: DictConfig) -> str:
    """Short hash of the resolved config minus tracking/run_dir/name (what the run computes)."""
    container = OmegaConf.to_container(cfg, resolve=True)
    content = {k: v for k, v in container.items() if k not in _NOT_HASHED}
    content["dataset"] = {k: v for k, v in content["dataset"].items() if k not in ("cache_dir", "chunk_size")}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:12]


def tokenizer_tags(cfg: DictConfig) -> dict[str, str]:
    """Short names of the run's tokenizer parts, for MLflow tags and leaderboards."""
    if cfg.method == "logreg":
        return {"fg": "-", "fe": "-", "fc": "-", "order": "-", "select": "-", "combine": "-",
                "tokenizer": "baseline:logreg", "preset": "logreg"}
    tags = {
        "fg": cfg.fg.name,
        "fe": cfg.fe.name,
        "fc": cfg.fc.name,
        "order": cfg.fc.order.name,
        "select": cfg.fc.select.name,
        "combine": cfg.fc.combine.name,
    }
    tags["tokenizer"] = f"{tags['fg']}/{tags['fe']}/{tags['fc']}"
    tags["preset"] = cfg.fc.name
    return tags


def run_directory(cfg: DictConfig, root: str | Path = "runs") -> Path:
    """The run's own directory: ``cfg.run_dir``, else a new
    ``<root>/<name>-<config hash>-<UTC time>`` (absolute), never shared between runs."""
    if cfg.run_dir:
        return Path(cfg.run_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return (Path(root) / f"{cfg.name}-{config_hash(cfg)}-{stamp}-{os.getpid()}").resolve()


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML (what is logged and compared on resume)."""
    return OmegaConf.to_yaml(cfg, resolve=True)


def check_resume(run_dir: Path, cfg: DictConfig) -> None:
    """Refuse to resume ``run_dir`` if it was written for a different configuration."""
    saved = run_dir / "config.yaml"
    if not saved.exists():
        raise TokbenchError(f"{run_dir}: not a tokbench run directory (no config.yaml); nothing to resume")
    previous = OmegaConf.merge(OmegaConf.structured(ExperimentConfig), OmegaConf.load(saved))
    if config_hash(previous) != config_hash(cfg):
        old = OmegaConf.to_container(previous, resolve=True)
        new = OmegaConf.to_container(cfg, resolve=True)
        diff = sorted(_diff(old, new))[:5]
        raise TokbenchError(
            f"{run_dir} belongs to a different configuration (differs in {', '.join(diff)}); "
            "resume with the same config or start a new run directory"
        )


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in set(a) | set(b):
            if prefix == "" and key in _NOT_HASHED:
                continue
            out += _diff(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]

