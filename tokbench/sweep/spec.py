"""Search-space files: one schema, expanded into trial configs and validated before launch.

A sweep file (``search_spaces/*.yaml``)::

    name: demo                       # the sweep's name (Ray experiment directory, MLflow parent run)
    plugins: [my_tokenizers.py]      # the user's modules (files relative to this one, or module
                                     # names); their components join the catalogue, and they
                                     # reach every node through Ray's runtime environment
    base:                            # every trial starts from this experiment
      experiment: cross_tissue       # built-in name, or a path relative to the sweep file
      overrides: [trainer.max_epochs=8, model.d_model=64]
    grid:                            # the cross product of these tokenizer parts...
      fg: [learned, pretrained]
      fe: [zero, linear]
      fc: [geneformer, scgpt]
    combinations:                    # ...plus explicit combinations (preset names or overrides)
      - {fg: learned, fe: bin_scgpt, fc: scgpt, overrides: [fe.n_bins=21]}
    baseline: true                   # one more row: logistic regression on expression
    params:                          # sampled hyperparameters (dotted config keys)
      optimizer.lr: {loguniform: [1.0e-4, 1.0e-2]}
      model.n_layers: {choice: [1, 2]}
    seeds: [0, 1, 2]                 # replicates of every combination
    max_epochs: 8                    # = trainer.max_epochs and ASHA's max_t
    scheduler: {name: asha, metric: val_mcc, mode: max, grace_period: 2, reduction_factor: 3}
    search: {algorithm: grid, num_samples: 1}   # grid | random | optuna
    resources: {cpu: 1, gpu: 0.25}   # per trial; a GPU fraction lets small trials share one GPU
    max_concurrent: 0                # 0 = as many as the cluster fits
    max_failures: 2                  # retries of a crashed trial, each from its last checkpoint
    tracking: {uri: "", experiment: ""}   # uri "" = $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db;
                                          # experiment "" = name
    storage_path: ""                 # "" = $TOKBENCH_STORAGE_PATH, else <cwd>/ray_results (must be
                                     # storage every node mounts at that path on a multi-node cluster)

The tokbench cluster manifests (docker/) set ``MLFLOW_TRACKING_URI`` and
``TOKBENCH_STORAGE_PATH`` on every node, so a sweep file that leaves both empty runs
unchanged on a laptop and on the cluster. The sweep hash (``--resume`` checks it) is of the
file's text alone, so resume a sweep with the environment it started with.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tokbench.errors import TokbenchError
from tokbench.training.experiment import (
    TOKENIZER_PARTS,
    compose,
    experiment_path,
    finalize,
    import_plugins,
    read_yaml_mapping,
    tokenizer_tags,
    user_modules,
)

SAMPLERS = ("loguniform", "uniform", "choice", "randint")
ALGORITHMS = ("grid", "random", "optuna")
SCHEDULERS = ("asha", "none")
# What every trial (transformer or baseline) reports each epoch that a scheduler can compare
# (EpochRunner._finish_epoch): a name outside these would never be seen, and ASHA would
# compare nothing.
SCHEDULER_METRICS = ("val_mcc", "val_accuracy", "val_macro_f1", "val_loss", "train_loss")


@dataclass
class BaseSpec:
    experiment: str = "cross_tissue"
    overrides: list[str] = field(default_factory=list)


@dataclass
class GridSpec:
    fg: list[str] = field(default_factory=list)
    fe: list[str] = field(default_factory=list)
    fc: list[str] = field(default_factory=list)


@dataclass
class SchedulerSpec:
    name: str = "asha"
    metric: str = "val_mcc"
    mode: str = "max"
    grace_period: int = 1
    reduction_factor: float = 3.0


@dataclass
class SearchSpec:
    algorithm: str = "grid"
    num_samples: int = 1


@dataclass
class ResourcesSpec:
    cpu: float = 1.0
    gpu: float = 0.0


@dataclass
class TrackingSpec:
    uri: str = ""
    experiment: str = ""


@dataclass
class SweepSpec:
    name: str = "sweep"
    description: str = ""
    plugins: list[str] = field(default_factory=list)
    base: BaseSpec = field(default_factory=BaseSpec)
    grid: GridSpec = field(default_factory=GridSpec)
    combinations: list[Any] = field(default_factory=list)
    baseline: bool = False
    params: dict[str, Any] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])
    max_epochs: Optional[int] = None
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    search: SearchSpec = field(default_factory=SearchSpec)
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    max_concurrent: int = 0
    max_failures: int = 2
    tracking: TrackingSpec = field(default_factory=TrackingSpec)
    storage_path: str = ""


@dataclass
class Sweep:
    """A loaded, validated sweep: the spec, its file, the base config and the trial grid."""

    spec: DictConfig
    path: Path
    base: dict  # the base experiment file as a plain mapping (overrides apply per trial)
    # {"label", "overrides", "baseline"} per tokenizer combination; "baseline" marks the
    # logistic-regression reference (method=logreg), which ASHA leaves alone.
    combinations: list[dict]
    text: str  # the sweep file as written

    @property
    def sweep_hash(self) -> str:
        """Hash of the sweep file's content (resume refuses a different file)."""
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]

    def trial_overrides(self, trial: dict) -> list[str]:
        """The overrides of one trial's Ray config ``{"combination", "seed", "params"}``."""
        # A grid entry replaces a whole tokenizer part; the base's dotted overrides
        # (fc.select.size=256) apply on top of it, then seed, epochs and sampled params.
        base = list(self.spec.base.overrides)
        parts = [o for o in base if o.partition("=")[0] in TOKENIZER_PARTS]
        dotted = [o for o in base if o not in parts]
        out = parts + list(self.combinations[trial["combination"]]["overrides"]) + dotted
        out.append(f"seed={int(trial['seed'])}")
        if self.spec.max_epochs:
            out.append(f"trainer.max_epochs={int(self.spec.max_epochs)}")
            out.append(f"baseline.max_epochs={int(self.spec.max_epochs)}")
        for key, value in (trial.get("params") or {}).items():
            out.append(f"{key}={json.dumps(value) if not isinstance(value, str) else value}")
        out.append(f"tracking.experiment={self.experiment_name}")
        return out

    def trial_config(self, trial: dict) -> DictConfig:
        """The resolved, validated experiment config of one trial."""
        where = f"{self.path}: trial {self.combinations[trial['combination']]['label']} seed {trial['seed']}"
        return finalize(compose(copy.deepcopy(self.base), self.trial_overrides(trial), where), where)

    def user_modules(self) -> list[str]:
        """Top-level modules of the user's code that some trial needs (plugins, ``module:Class``)."""
        out: list[str] = []
        for i in range(len(self.combinations)):
            cfg = self.trial_config({"combination": i, "seed": self.spec.seeds[0], "params": {}})
            out += [m for m in user_modules(cfg) if m not in out]
        return out

    @property
    def experiment_name(self) -> str:
        return self.spec.tracking.experiment or self.spec.name

    def representative_trials(self) -> list[dict]:
        """Every combination x seed, with sampled params at their extremes (for validation)."""
        corners = [{}]
        params = OmegaConf.to_container(self.spec.params)
        if params:
            options = {key: _extremes(key, value, self.path) for key, value in params.items()}
            corners = [dict(zip(options, values)) for values in itertools.product(*options.values())][:16]
        return [
            {"combination": c, "seed": s, "params": p}
            for c in range(len(self.combinations))
            for s in self.spec.seeds
            for p in corners
        ]

    def n_trials(self) -> int:
        """How many trials the sweep launches."""
        n = len(self.combinations) * len(self.spec.seeds) * self.spec.search.num_samples
        if self.spec.search.algorithm == "grid":
            for value in OmegaConf.to_container(self.spec.params).values():
                n *= len(value["choice"])
        return n


def _extremes(key: str, spec: Any, path: Path) -> list[Any]:
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SAMPLERS:
        raise TokbenchError(
            f"{path}: params.{key}: expected one of {{{', '.join(f'{s}: ...' for s in SAMPLERS)}}}, got {spec!r}"
        )
    kind, args = next(iter(spec.items()))
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise TokbenchError(f"{path}: params.{key}.choice: expected a non-empty list")
        return list(args)
    if not isinstance(args, list) or len(args) != 2 or not all(isinstance(a, (int, float)) for a in args) or args[0] >= args[1]:
        raise TokbenchError(f"{path}: params.{key}.{kind}: expected [low, high] with low < high, got {args!r}")
    if kind == "loguniform" and args[0] <= 0:
        raise TokbenchError(f"{path}: params.{key}.loguniform: bounds must be > 0, got {args!r}")
    if kind == "randint":
        if not all(isinstance(a, int) for a in args):
            raise TokbenchError(f"{path}: params.{key}.randint: expected integer bounds, got {args!r}")
        return [args[0], args[1] - 1]  # Ray's randint excludes the upper bound
    return list(args)


def _combination(entry: Any, index: int, path: Path) -> dict:
    if not isinstance(entry, dict):
        raise TokbenchError(f"{path}: combinations[{index}]: expected a mapping like {{fg: learned, fe: zero, fc: uce}}")
    unknown = set(entry) - {*TOKENIZER_PARTS, "method", "overrides", "label"}
    if unknown:
        raise TokbenchError(
            f"{path}: combinations[{index}]: unknown key(s) {sorted(unknown)}; valid: fg, fe, fc, method, overrides, label"
        )
    overrides = [f"{part}={_part_value(entry[part])}" for part in TOKENIZER_PARTS if part in entry]
    if "method" in entry:
        overrides.append(f"method={entry['method']}")
    extra = entry.get("overrides", [])
    if not isinstance(extra, list) or not all(isinstance(o, str) for o in extra):
        raise TokbenchError(f"{path}: combinations[{index}].overrides: expected a list of KEY=VALUE strings")
    label = (entry.get("label") or "/".join(_part_label(entry[p]) for p in TOKENIZER_PARTS if p in entry)
             or entry.get("method", "base"))
    overrides += extra
    return {"label": label + ("" if not extra else " " + " ".join(extra)), "overrides": overrides,
            "baseline": "method=logreg" in overrides}


def _part_value(value: Any) -> str:
    """A combination's part as an override value: a preset or component name, or a mapping
    (``{name: my_tokenizers:LogBinFe, n_bins: 10}``) written as JSON, which YAML reads."""
    return json.dumps(value) if isinstance(value, dict) else str(value)


def _part_label(value: Any) -> str:
    """Short label of a part: its name (a user class by its class name), then any parameters."""
    if not isinstance(value, dict):
        return str(value).rpartition(":")[2] if ":" in str(value) else str(value)
    name = value.get("preset") or value.get("name") or "custom"
    name = str(name).rpartition(":")[2]
    params = [f"{k}={v}" for k, v in value.items() if k not in ("name", "preset") and not isinstance(v, dict)]
    return name + (f"({','.join(params)})" if params else "")


def load_sweep(path: str | Path) -> Sweep:
    """Read and check a sweep file; raises :class:`TokbenchError` naming the file and key."""
    path = Path(path).expanduser().resolve()
    raw = read_yaml_mapping(path)
    try:
        spec = OmegaConf.merge(OmegaConf.structured(SweepSpec), raw)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise TokbenchError(f"{path}: {key}: {str(err).splitlines()[0]}") from None
    _check_choice(spec.search.algorithm, ALGORITHMS, "search.algorithm", path)
    _check_choice(spec.scheduler.name, SCHEDULERS, "scheduler.name", path)
    _check_choice(spec.scheduler.mode, ("max", "min"), "scheduler.mode", path)
    _check_choice(spec.scheduler.metric, SCHEDULER_METRICS, "scheduler.metric", path)
    for key, low in (("search.num_samples", 1), ("scheduler.grace_period", 1), ("max_failures", 0), ("max_concurrent", 0)):
        if OmegaConf.select(spec, key) < low:
            raise TokbenchError(f"{path}: {key}: must be >= {low}, got {OmegaConf.select(spec, key)}")
    if spec.scheduler.reduction_factor <= 1:
        raise TokbenchError(f"{path}: scheduler.reduction_factor: must be > 1, got {spec.scheduler.reduction_factor}")
    if spec.resources.cpu <= 0 or spec.resources.gpu < 0:
        raise TokbenchError(f"{path}: resources: cpu must be > 0 and gpu >= 0, got {dict(spec.resources)}")
    if spec.resources.gpu > 1 and spec.resources.gpu != int(spec.resources.gpu):
        raise TokbenchError(f"{path}: resources.gpu: a fraction must be below 1 (e.g. 0.25), or a whole number of GPUs")
    if not spec.seeds:
        raise TokbenchError(f"{path}: seeds: give at least one seed")
    if spec.max_epochs is not None and spec.max_epochs < 1:
        raise TokbenchError(f"{path}: max_epochs: must be >= 1, got {spec.max_epochs}")

    base_file = Path(spec.base.experiment)
    if base_file.suffix in (".yaml", ".yml") and not base_file.is_absolute():
        base_file = path.parent / base_file
    base_path = experiment_path(str(base_file))
    base = read_yaml_mapping(base_path)
    # The sweep's plugins and the base experiment's, as module names: a worker on another
    # node imports them by name from what the runtime environment ships.
    modules = import_plugins(list(spec.plugins), path.parent, str(path))
    if base.get("plugins"):
        modules += import_plugins(base["plugins"], base_path.resolve().parent, str(base_path))
    base["plugins"] = list(dict.fromkeys(modules))
    base_cfg = compose(base, list(spec.base.overrides), f"{path}: base")

    grid = {part: list(spec.grid[part]) for part in TOKENIZER_PARTS if spec.grid[part]}
    combos: list[dict] = []
    if grid:
        parts = list(grid)
        for values in itertools.product(*grid.values()):
            entry = dict(zip(parts, values))
            combos.append(_combination(entry, len(combos), path))
    for i, entry in enumerate(OmegaConf.to_container(spec.combinations)):
        combos.append(_combination(entry, i, path))
    if spec.baseline:
        combos.append({"label": "baseline:logreg", "overrides": ["method=logreg"], "baseline": True})
    if not combos:
        combos.append({"label": "base", "overrides": [], "baseline": False})

    params = OmegaConf.to_container(spec.params)
    for key, value in params.items():
        _extremes(key, value, path)
        if OmegaConf.select(base_cfg, key, default="__absent__") == "__absent__":
            raise TokbenchError(f"{path}: params.{key}: no such config key in the experiment")
        if spec.search.algorithm == "grid" and next(iter(value)) != "choice":
            raise TokbenchError(
                f"{path}: params.{key}: search.algorithm=grid enumerates `choice` lists only; "
                "use search.algorithm=random or optuna to sample ranges"
            )
    if spec.search.algorithm == "optuna":
        if not params:
            raise TokbenchError(f"{path}: params: search.algorithm=optuna needs sampled params")
        if len(combos) != 1 or len(spec.seeds) != 1:
            raise TokbenchError(
                f"{path}: search.algorithm=optuna tunes hyperparameters of one tokenizer with one seed; "
                f"this file has {len(combos)} combinations and {len(spec.seeds)} seeds"
            )
    return Sweep(spec=spec, path=path, base=base, combinations=combos, text=path.read_text())


def _check_choice(value: str, choices: tuple, key: str, path: Path) -> None:
    if value not in choices:
        raise TokbenchError(f"{path}: {key}: {value!r} is not one of {', '.join(choices)}")


def dry_run(sweep: Sweep) -> str:
    """Expand and validate every trial config; return the report printed by ``--dry-run``."""
    configs = [sweep.trial_config(t) for t in sweep.representative_trials()]
    for cfg in configs:
        _check_files(cfg, sweep.path)
    spec = sweep.spec
    lines = [
        f"sweep      {spec.name}  ({sweep.path})",
        f"trials     {sweep.n_trials()} = {len(sweep.combinations)} combinations x {len(spec.seeds)} seeds"
        + (f" x {spec.search.num_samples} samples" if spec.search.num_samples > 1 else "")
        + (" x param grid" if spec.search.algorithm == "grid" and spec.params else ""),
        f"search     {spec.search.algorithm}; scheduler {spec.scheduler.name}"
        + (f" (metric {spec.scheduler.metric} {spec.scheduler.mode}, grace {spec.scheduler.grace_period}, "
           f"reduction {spec.scheduler.reduction_factor:g}, max epochs {configs[0].trainer.max_epochs})"
           if spec.scheduler.name == "asha" else ""),
        f"resources  {spec.resources.cpu:g} CPU, {spec.resources.gpu:g} GPU per trial; "
        f"max concurrent {spec.max_concurrent or 'unlimited'}; retries {spec.max_failures}",
        "",
        "combinations:",
    ]
    for i, combo in enumerate(sweep.combinations):
        tags = tokenizer_tags(sweep.trial_config({"combination": i, "seed": spec.seeds[0], "params": {}}))
        lines.append(f"  {i:>3}  {combo['label']:<40} order={tags['order']} select={tags['select']} combine={tags['combine']}")
    return "\n".join(lines)


def _check_files(cfg: DictConfig, where: Path) -> None:
    if not Path(cfg.dataset.path).exists():
        raise TokbenchError(f"{where}: dataset.path {cfg.dataset.path}: no such file")
    fg_path = cfg.fg.get("path")
    if cfg.method == "transformer" and cfg.fg.get("name") == "pretrained" and fg_path and not Path(fg_path).exists():
        raise TokbenchError(f"{where}: fg.path {cfg.fg.path}: no such file")

