"""Configs of the tokenizer parts (Fg, Fe, Fc) and the Fc preset files.

A part's config is a mapping ``{name: COMPONENT, **parameters}``; ``name`` picks a
registered component (``tokbench tokenizers`` lists them) or a class of the user's own
(``module:Class``), and the parameters are checked against that component's ``Params``
(:mod:`registry`): a typo or a leftover from another component is an error naming the key.
The Fc is ``{name: LABEL, select: {...}, order: {...}, combine: {...}}``.

Fc presets are YAML files under ``tokbench/configs/fc/``: what makes a preset is the
combination of select, order and combine. ``fg=NAME`` and ``fe=NAME`` name a component
with its default parameters. :func:`load_component` reads either into a ``DictConfig``
that command-line overrides (``fc=uce fc.select.size=512 fe=linear``) merge into.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tokbench.errors import TokbenchError
from tokbench.tokenizers import registry

GROUPS = ("fg", "fe", "fc")
FC_SECTIONS = ("select", "order", "combine")


@dataclass
class FcSchema:
    """Cell constructor: select, then order, then combine. ``name`` labels the preset it came from."""

    name: str = "custom"
    order: Any = field(default_factory=lambda: {"name": registry.DEFAULT_NAMES["order"]})
    select: Any = field(default_factory=lambda: {"name": registry.DEFAULT_NAMES["select"]})
    combine: Any = field(default_factory=lambda: {"name": registry.DEFAULT_NAMES["combine"]})


def _part(name: str, params: dict) -> dict:
    return {"name": name, **{k: v for k, v in params.items() if v is not None}}


def FgConfig(name: str = "learned", **params) -> dict:  # noqa: N802 (reads like the config it builds)
    """An Fg config mapping: ``FgConfig("pretrained", path=...)``; None values are left out."""
    return _part(name, params)


def FeConfig(name: str = "zero", **params) -> dict:  # noqa: N802
    """An Fe config mapping: ``FeConfig("bin_scgpt", n_bins=51)``."""
    return _part(name, params)


def OrderConfig(name: str = "expression", **params) -> dict:  # noqa: N802
    """An order config mapping: ``OrderConfig("expression", normalize_by_median=True)``."""
    return _part(name, params)


def SelectConfig(name: str = "truncate", **params) -> dict:  # noqa: N802
    """A selection config mapping: ``SelectConfig("truncate", size=2048)``."""
    return _part(name, params)


def CombineConfig(name: str = "sum", **params) -> dict:  # noqa: N802
    """A combine config mapping: ``CombineConfig("sum")``."""
    return _part(name, params)


def FcConfig(name: str = "custom", order: Optional[dict] = None, select: Optional[dict] = None,  # noqa: N802
             combine: Optional[dict] = None) -> dict:
    """An Fc config mapping from its three sections (defaults: expression, truncate, sum)."""
    return {"name": name, "order": order or OrderConfig(), "select": select or SelectConfig(),
            "combine": combine or CombineConfig()}


def _valid(names) -> str:
    return ", ".join(sorted(names))


def to_config(group: str, cfg: Any) -> DictConfig:
    """Coerce ``cfg`` (mapping or DictConfig) into a part config of ``group``; for ``fc``,
    unknown top-level keys raise :class:`TokbenchError` naming the key."""
    if group not in GROUPS:
        raise TokbenchError(f"unknown tokenizer part {group!r}; valid: {', '.join(GROUPS)}")
    if cfg is None:
        cfg = {}
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        cfg = dataclasses.asdict(cfg)
    if group != "fc":
        if isinstance(cfg, str):
            cfg = {"name": cfg}
        if not isinstance(cfg, (dict, DictConfig)):
            raise TokbenchError(f"{group}: expected a mapping {{name: ..., ...}} or a component name (got {cfg!r})")
        merged = OmegaConf.create(cfg if isinstance(cfg, DictConfig) else dict(cfg))
        if "name" not in merged:
            merged.name = registry.DEFAULT_NAMES[group]
        return merged
    try:
        return OmegaConf.merge(OmegaConf.structured(FcSchema), cfg)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or ""
        fields = ", ".join(f.name for f in dataclasses.fields(FcSchema))
        raise TokbenchError(f"fc config: {str(err).splitlines()[0]} (key fc.{key}); valid keys here: {fields}") from None


def parts(fg: Any, fe: Any, fc: Any) -> dict[str, registry.Component]:
    """The five checked components of a tokenizer config, by kind (``fg``, ``fe``, ``order``,
    ``select``, ``combine``); raises TokbenchError for any bad name, parameter or
    combination, naming the config key."""
    fc_cfg = to_config("fc", fc)
    built = {"fg": registry.build("fg", to_config("fg", fg)), "fe": registry.build("fe", to_config("fe", fe))}
    for section in FC_SECTIONS:
        built[section] = registry.build(section, fc_cfg[section], f"fc.{section}")
    combine, fe_part = built["combine"], built["fe"]
    if not combine.uses_expression and fe_part.label() != "zero":
        raise TokbenchError(f"fc.combine={combine.label()} ignores the expression encoder, but fe={fe_part.label()}; "
                            "use fe=zero or a combine that uses it (sum, concat)")
    if built["select"].label() == "panel" and built["order"].label() != "gene_index":
        raise TokbenchError(f"fc.select.name=panel lists every gene in gene-index order, but "
                            f"fc.order.name={built['order'].label()}; set fc.order.name=gene_index")
    return built


def _config_dir():
    return resources.files("tokbench") / "configs" / "fc"


def preset_names(group: str) -> list[str]:
    """Names ``group=NAME`` accepts: the Fc preset files, or the registered Fg / Fe components."""
    if group not in GROUPS:
        raise TokbenchError(f"unknown tokenizer part {group!r}; valid: {', '.join(GROUPS)}")
    if group != "fc":
        return sorted(registry.registered(group))
    return sorted(p.name[: -len(".yaml")] for p in _config_dir().iterdir() if p.name.endswith(".yaml"))


def preset_description(group: str, name: str) -> str:
    """The first comment line of an Fc preset file, or an Fg / Fe component's description."""
    if group != "fc":
        return registry.lookup(group, name, group).description
    text = (_config_dir() / f"{name}.yaml").read_text()
    for line in text.splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def load_component(group: str, name: str) -> DictConfig:
    """The config ``group=name`` stands for: an Fc preset file, or ``{name: NAME}`` for an Fg
    or Fe component (a registered name or ``module:Class``) with its default parameters.

    The result merges overrides (``OmegaConf.merge(cfg, OmegaConf.from_dotlist([...]))``).
    Unknown groups or names raise :class:`TokbenchError` listing the valid ones.
    """
    if group not in GROUPS:
        raise TokbenchError(f"unknown tokenizer part {group!r}; valid: {', '.join(GROUPS)}")
    if group != "fc":
        registry.lookup(group, name, group)
        return OmegaConf.create({"name": name})
    names = preset_names(group)
    if name not in names:
        raise TokbenchError(f"unknown fc preset {name!r}; valid: {', '.join(names)} (or a mapping "
                            "{select: ..., order: ..., combine: ...})")
    raw = OmegaConf.create((_config_dir() / f"{name}.yaml").read_text())
    return to_config(group, raw)
