"""Typed configuration of the tokenizer parts (Fg, Fe, Fc) and the preset files.

Each part is a small dataclass usable with ``OmegaConf.structured``. ``name`` picks the
component; every other field is a parameter that only some components take. A field left
at ``None`` takes the component's default (see :data:`COMPONENTS` or ``tokbench
tokenizers``); setting a parameter the chosen component does not take is an error, so a
typo or a leftover from another component never passes silently.

Presets are YAML files under ``tokbench/configs/{fg,fe,fc}/``; :func:`load_component`
reads one into a typed ``DictConfig`` that command-line overrides
(``fc=uce fc.select.size=512 fe=linear``) merge into.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tokbench.errors import TokbenchError


@dataclass
class FgConfig:
    """Gene identity encoder: ``learned`` or ``pretrained`` (vectors from ``path``)."""

    name: str = "learned"
    path: Optional[str] = None
    format: Optional[str] = None
    gene_column: Optional[str] = None
    gene_list: Optional[str] = None
    frozen: Optional[bool] = None
    pca: Optional[bool] = None
    missing: Optional[str] = None
    min_fraction_mapped: Optional[float] = None


@dataclass
class FeConfig:
    """Expression encoder: ``zero``, ``linear``, ``mlp``, ``bin_scbert``, ``bin_scgpt`` or ``autobin``."""

    name: str = "zero"
    n_bins: Optional[int] = None
    hidden: Optional[int] = None
    alpha: Optional[float] = None


@dataclass
class OrderConfig:
    """Order of the selected genes in the sentence."""

    name: str = "expression"
    normalize_by_median: Optional[bool] = None


@dataclass
class SelectConfig:
    """Which genes enter the sentence; ``size`` is L (S draws for ``weighted_sample``, the
    largest panel accepted for ``panel``)."""

    name: str = "truncate"
    size: Optional[int] = None
    resample: Optional[bool] = None


@dataclass
class CombineConfig:
    """How the gene and expression vectors of a token combine."""

    name: str = "sum"


@dataclass
class FcConfig:
    """Cell constructor: select, then order, then combine. ``name`` labels the preset it came from."""

    name: str = "custom"
    order: OrderConfig = field(default_factory=OrderConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    combine: CombineConfig = field(default_factory=CombineConfig)


REQUIRED = object()  # marks a parameter without a default


@dataclass(frozen=True)
class Component:
    """A selectable part: one-line description and its parameters ``{name: (default, help)}``."""

    description: str
    params: dict[str, tuple[Any, str]] = field(default_factory=dict)


COMPONENTS: dict[str, dict[str, Component]] = {
    "fg": {
        "learned": Component("one trainable vector per gene of the dataset (random init)"),
        "pretrained": Component(
            "vectors from a file, matched by symbol or Ensembl id",
            {
                "path": (REQUIRED, "gene-vector file: .pt, .txt, .csv, .tsv, .parquet or .npy"),
                "format": ("auto", "auto | torch | text | csv | tsv | parquet | npy"),
                "gene_column": (None, "gene-id column of a table (- = the first)"),
                "gene_list": (None, "file with one gene id per line, for .npy"),
                "frozen": (True, "keep the file's vectors fixed (a projection still trains)"),
                "pca": (False, "reduce to d_model by PCA fitted on the file's vectors"),
                "missing": ("drop", "genes the file lacks: drop | learn"),
                "min_fraction_mapped": (0.5, "refuse when fewer dataset genes map"),
            },
        ),
    },
    "fe": {
        "zero": Component("no expression vector (expression acts via order/selection)"),
        "linear": Component("w*x + b"),
        "mlp": Component(
            "Linear(1,hidden) > GELU > Linear(hidden,d_model)", {"hidden": (None, "width (default d_model)")}
        ),
        "bin_scbert": Component(
            "scBERT: floor(log2(1 + normalised count)) capped at n_bins, embedded",
            {"n_bins": (5, "cap B (classes 0..B)")},
        ),
        "bin_scgpt": Component(
            "per-cell quantile bins of the nonzero values, embedded + LayerNorm",
            {"n_bins": (51, "B, including the zero bin")},
        ),
        "autobin": Component(
            "soft binning: softmax over learned bin vectors (scFoundation)",
            {"n_bins": (100, "number of bin vectors"), "alpha": (1.0, "residual weight")},
        ),
    },
    "order": {
        "expression": Component(
            "descending expression; ties by gene index",
            {"normalize_by_median": (False, "rank count/total/median of training cells (Geneformer)")},
        ),
        "random": Component("random permutation, fresh each epoch"),
        "chromosome": Component("chromosome groups in random order, genes by start (UCE)"),
        "gene_index": Component("fixed gene order of the dataset"),
        "none": Component("keep the order of the data (CSR order)"),
    },
    "select": {
        "truncate": Component("the first `size` genes by the order's own key", {"size": (2048, "L")}),
        "sample": Component("`size` genes uniformly without replacement", {"size": (1200, "L")}),
        "weighted_sample": Component(
            "`size` draws, p ~ log1p(raw count) (UCE)",
            {"size": (1024, "S draws"), "resample": (True, "with replacement (false: without)")},
        ),
        "panel": Component(
            "every gene of the panel, zeros included (scBERT); order gene_index",
            {"size": (2048, "L: a larger panel is refused")},
        ),
    },
    "combine": {
        "sum": Component("gene vector + expression vector"),
        "gene_only": Component("gene vector only (needs fe=zero)"),
        "concat": Component("Linear(concat(gene, expression)) to d_model"),
    },
}

SCHEMAS = {"fg": FgConfig, "fe": FeConfig, "fc": FcConfig}
_FC_SECTIONS = {"order": OrderConfig, "select": SelectConfig, "combine": CombineConfig}


def _valid(names) -> str:
    return ", ".join(sorted(names))


def to_config(group: str, cfg: Any) -> DictConfig:
    """Coerce ``cfg`` (dataclass, dict or DictConfig) into the typed schema of ``group``.

    Unknown keys and ill-typed values raise :class:`TokbenchError` naming the key.
    """
    if group not in SCHEMAS:
        raise TokbenchError(f"unknown tokenizer part {group!r}; valid: {_valid(SCHEMAS)}")
    schema = SCHEMAS[group]
    if cfg is None:
        cfg = {}
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        cfg = OmegaConf.structured(cfg)
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), cfg)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or ""
        section = schema
        if "." in key and key.split(".")[0] in _FC_SECTIONS:
            section = _FC_SECTIONS[key.split(".")[0]]
        fields = _valid(f.name for f in dataclasses.fields(section))
        raise TokbenchError(
            f"{group} config: {str(err).splitlines()[0]} (key {group}.{key}); valid keys here: {fields}"
        ) from None


def resolve_params(kind: str, section: DictConfig, where: str) -> tuple[str, dict[str, Any]]:
    """Return ``(name, params)`` of one component section with the component's defaults filled in.

    ``kind`` is ``fg``, ``fe``, ``order``, ``select`` or ``combine``; ``where`` is the config
    path used in messages (``fc.select``). Raises :class:`TokbenchError` for an unknown
    name, a parameter the component does not take, or a required parameter left unset.
    """
    catalogue = COMPONENTS[kind]
    name = section.name
    if name not in catalogue:
        raise TokbenchError(f"{where}.name={name!r} is not a known {kind}; valid: {_valid(catalogue)}")
    accepted = catalogue[name].params
    params: dict[str, Any] = {}
    for key in section.keys():
        if key == "name":
            continue
        if OmegaConf.is_missing(section, key):
            value = REQUIRED
        else:
            value = section[key]
        if key not in accepted:
            if value is not None and value is not REQUIRED:
                takes = _valid(accepted) or "no parameters"
                raise TokbenchError(
                    f"{where}: {kind} {name!r} does not take {key!r} (set to {value!r}); it takes: {takes}"
                )
            continue
        params[key] = value
    for key, (default, _) in accepted.items():
        if params.get(key) is None or params[key] is REQUIRED:
            params[key] = default
        if params[key] is REQUIRED:
            raise TokbenchError(f"{where}: {kind} {name!r} needs {where}.{key}=... ({accepted[key][1]})")
    return name, params


def _config_dir(group: str):
    return resources.files("tokbench") / "configs" / group


def preset_names(group: str) -> list[str]:
    """Names of the preset files of ``group`` (``fg``, ``fe`` or ``fc``), sorted."""
    if group not in SCHEMAS:
        raise TokbenchError(f"unknown tokenizer part {group!r}; valid: {_valid(SCHEMAS)}")
    folder = _config_dir(group)
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def preset_description(group: str, name: str) -> str:
    """The first comment line of a preset file (its one-line description)."""
    text = (_config_dir(group) / f"{name}.yaml").read_text()
    for line in text.splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def load_component(group: str, name: str) -> DictConfig:
    """Load preset ``name`` of part ``group`` (``fg``, ``fe``, ``fc``) as a typed ``DictConfig``.

    The result merges overrides (``OmegaConf.merge(cfg, OmegaConf.from_dotlist([...]))``)
    with type checking. Unknown groups or names raise :class:`TokbenchError` listing the
    valid ones.
    """
    names = preset_names(group)
    if name not in names:
        raise TokbenchError(f"unknown {group} preset {name!r}; valid: {', '.join(names)}")
    raw = OmegaConf.create((_config_dir(group) / f"{name}.yaml").read_text())
    return to_config(group, raw)
