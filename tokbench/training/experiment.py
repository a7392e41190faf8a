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
from tokbench.tokenizers import registry
from tokbench.tokenizers.config import FcSchema, load_component, parts, to_config
from tokbench.tokenizers.tokenizer import tokenizer_tags as _part_tags
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
    not set, so a sweep can switch Fg by preset name alone. ``plugins`` lists the user's
    modules (dotted names, or ``.py`` files and package folders relative to the experiment
    file) imported before the config is checked, so the components they register can be
    named; a part named ``module:Class`` imports its module by itself."""

    name: str = "experiment"
    method: str = "transformer"
    seed: int = 0
    run_dir: str = ""
    gene_embeddings: Optional[str] = None
    plugins: list[str] = field(default_factory=list)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    fg: Any = field(default_factory=lambda: {"name": registry.DEFAULT_NAMES["fg"]})
    fe: Any = field(default_factory=lambda: {"name": registry.DEFAULT_NAMES["fe"]})
    fc: FcSchema = field(default_factory=FcSchema)
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
        preset = load_component(part, value["preset"])
        # A section (or part) naming another component replaces the preset's: parameters of
        # the preset's component would not fit it.
        for section in (("order", "select", "combine") if part == "fc" else ()):
            if isinstance(rest.get(section), dict) and rest[section].get("name") not in (None, preset[section].name):
                preset[section] = rest.pop(section)
        if part != "fc" and rest.get("name") not in (None, preset.name):
            return rest
        try:
            return OmegaConf.merge(preset, rest)
        except OmegaConfBaseException as err:
            raise _schema_error(err, f"{where}: {part}") from None
    return value


def _flow_mapping(item: str, value: str) -> dict:
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise TokbenchError(f"override {item!r}: not a YAML mapping ({str(err).splitlines()[0]})") from None
    if not isinstance(parsed, dict):
        raise TokbenchError(f"override {item!r}: expected a mapping like {{name: linear}}")
    return parsed


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
            if key in TOKENIZER_PARTS and not value.startswith("{"):
                cfg[key] = load_component(key, value)
            elif key in TOKENIZER_PARTS:
                # a whole part as a mapping replaces the part (no leftover parameters)
                part = _expand_part(key, _flow_mapping(item, value), f"override {item!r}")
                cfg[key] = to_config(key, part)
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
    if "plugins" in base:
        base["plugins"] = import_plugins(base["plugins"], Path(path).resolve().parent, where)
    else:
        registry.plugin_search_path([Path.cwd()])
    cfg = compose(base, overrides, where)
    return finalize(cfg, where)


def import_plugins(entries: Any, folder: Optional[Path], where: str) -> list[str]:
    """Import an experiment's ``plugins`` (see :class:`ExperimentConfig`) and make modules in
    its folder and the working directory importable; return the module names (what the
    resolved config keeps, so a worker elsewhere imports them by name)."""
    if not isinstance(entries, (list, tuple)) or not all(isinstance(e, str) for e in entries):
        raise TokbenchError(f"{where}: plugins: expected a list of module names or .py files (got {entries!r})")
    registry.plugin_search_path([p for p in (Path.cwd(), folder) if p is not None])
    try:
        return registry.load_plugins(entries, folder)
    except TokbenchError as err:
        raise TokbenchError(f"{where}: {err}") from None


def component_names(cfg: DictConfig) -> list[str]:
    """The names of the five tokenizer components a config uses (``fg``, ``fe``, then the Fc's)."""
    fc = cfg.fc
    return [str(cfg.fg.get("name", "")), str(cfg.fe.get("name", "")),
            *(str(fc[s].get("name", "")) for s in ("order", "select", "combine"))]


def user_modules(cfg: DictConfig) -> list[str]:
    """Top-level modules of the user's own code a run needs: its ``plugins`` and the modules
    of components named ``module:Class``."""
    if cfg.method != "transformer":  # the baseline runs no tokenizer part
        return []
    return registry.user_modules(component_names(cfg), list(cfg.plugins))


def finalize(cfg: DictConfig, where: str = "config") -> DictConfig:
    """Resolve interpolations, make file paths absolute, validate; return a resolved copy."""
    if cfg.fg.get("name") == "pretrained" and not cfg.fg.get("path") and cfg.gene_embeddings:
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
        if holder.get(key):
            holder[key] = str(Path(holder[key]).expanduser().resolve())
    validate(resolved, where)
    return resolved


def validate(cfg: DictConfig, where: str = "config") -> None:
    """Check every section's values (ranges, names, component parameters)."""
    check_choice(cfg.method, METHODS, "method")
    if cfg.plugins:
        try:
            registry.load_plugins(list(cfg.plugins))
        except TokbenchError as err:
            raise TokbenchError(f"{where}: {err}") from None
    validate_model_config(cfg.model)
    validate_optimizer_config(cfg.optimizer)
    validate_scheduler_config(cfg.scheduler)
    validate_trainer_config(cfg.trainer)
    validate_baseline_config(cfg.baseline)
    try:
        parts(cfg.fg, cfg.fe, cfg.fc)
    except TokbenchError as err:
        raise TokbenchError(f"{where}: {err}") from None


# Sections that do not change what a run computes: where it is logged or stored.
_NOT_HASHED = ("tracking", "run_dir", "name")


def config_hash(cfg: DictConfig) -> str:
    """Short hash of the resolved config minus tracking/run_dir/name (what the run computes)."""
    container = OmegaConf.to_container(cfg, resolve=True)
    content = {k: v for k, v in container.items() if k not in _NOT_HASHED}
    content["dataset"] = {k: v for k, v in content["dataset"].items() if k not in ("cache_dir", "chunk_size")}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:12]


def tokenizer_tags(cfg: DictConfig) -> dict[str, str]:
    """Short names of the run's tokenizer parts, for MLflow tags and leaderboards (see
    :func:`tokbench.tokenizers.tokenizer.tokenizer_tags`); the baseline has its own."""
    if cfg.method == "logreg":
        return {"fg": "-", "fe": "-", "fc": "-", "order": "-", "select": "-", "combine": "-",
                "tokenizer": "baseline:logreg", "preset": "logreg"}
    return _part_tags(cfg.fg, cfg.fe, cfg.fc)


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

