"""The component registry: every Fg, Fe, order, select and combine is one registered class.

A component is a subclass of one of the five bases (:class:`GeneEncoder`,
:class:`ExpressionEncoder`, :class:`Order`, :class:`Select`, :class:`Combine`, all in
:mod:`tokbench.tokenizers.parts`) with

- ``name``: what configs call it (``fe: {name: bin_scgpt}``);
- ``description``: one line for the catalogue;
- ``reference``: where its definition comes from (repository and file, or a paper);
- ``Params``: a dataclass of its parameters, whose defaults are the component's defaults
  (the only place they are written). A field made with :func:`param` carries its help
  text and its allowed range or choices, checked by :func:`parse`.

``@register`` adds a class to the registry. The catalogue (``tokbench tokenizers``), the
config checks and their error messages all read the registry, so a component cannot be
listed without code or coded without being listed.

A config may also name a component by import path, ``module:Class`` (``fe: {name:
my_tokenizers:LogBinFe}``): the module is imported (from the experiment's folder, the
working directory or ``sys.path``) and the class used without registration. Modules named
in a ``plugins:`` list are imported before anything else, so the components they
``@register`` can be called by their short names.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import sys
from dataclasses import MISSING, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar, Iterable, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tokbench.errors import TokbenchError

KINDS = ("fg", "fe", "order", "select", "combine")
# Where each kind sits in an experiment config (for messages).
CONFIG_PATH = {"fg": "fg", "fe": "fe", "order": "fc.order", "select": "fc.select", "combine": "fc.combine"}
TITLES = {"fg": "gene identity encoder (Fg)", "fe": "expression encoder (Fe)", "order": "order",
          "select": "selection", "combine": "combine rule"}


def param(default: Any = MISSING, help: str = "", *, low: float | None = None, high: float | None = None,
          choices: Sequence[Any] | None = None) -> Any:
    """A parameter field: ``default`` (MISSING: required), a help line for the catalogue, and
    the allowed closed range ``[low, high]`` or ``choices`` that :func:`parse` enforces."""
    metadata = {"help": help, "low": low, "high": high, "choices": tuple(choices) if choices else None}
    return dataclasses.field(default=default, metadata=metadata)


@dataclass
class NoParams:
    """Parameters of a component that takes none."""


class Component:
    """Base of every tokenizer part; see the module docstring for what a subclass declares.

    An instance holds its resolved ``params`` (an instance of ``Params``); the tokenizer
    builder calls the kind-specific methods of the base classes in :mod:`parts`.
    """

    kind: ClassVar[str] = ""
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    reference: ClassVar[str] = ""
    Params: ClassVar[type] = NoParams

    def __init__(self, params: Any = None):
        self.params = params if params is not None else self.Params()

    @classmethod
    def label(cls) -> str:
        """The name runs are tagged with: the registered name, else ``module:Class``."""
        return cls.name or f"{cls.__module__}:{cls.__qualname__}"

    def check(self, where: str) -> None:
        """Checks across parameters beyond :func:`param`'s ranges; raise TokbenchError. ``where``
        is the config path (``fc.select``) to name in messages."""


_REGISTRY: dict[str, dict[str, type[Component]]] = {kind: {} for kind in KINDS}


def register(cls: type[Component]) -> type[Component]:
    """Class decorator: add a component to the registry under ``cls.kind`` / ``cls.name``.

    Refuses a class without a kind, name or description, a ``Params`` that is not a
    dataclass, or a name already taken by another class.
    """
    where = f"{cls.__module__}.{cls.__qualname__}"
    if cls.kind not in KINDS:
        raise TypeError(f"{where}: kind {cls.kind!r} is not one of {', '.join(KINDS)}; subclass a base of "
                        "tokbench.tokenizers.parts (GeneEncoder, ExpressionEncoder, Order, Select, Combine)")
    if not cls.name or ":" in cls.name or "." in cls.name:
        raise TypeError(f"{where}: set a short `name` (letters, digits, _) to register it")
    if not cls.description:
        raise TypeError(f"{where}: set a one-line `description` (the catalogue shows it)")
    if not dataclasses.is_dataclass(cls.Params):
        raise TypeError(f"{where}: `Params` must be a dataclass (got {cls.Params!r})")
    _check_params_class(cls, where)
    taken = _REGISTRY[cls.kind].get(cls.name)
    if taken is not None and _qualified(taken) != _qualified(cls):
        raise TypeError(f"{where}: {cls.kind} name {cls.name!r} is taken by {_qualified(taken)}")
    _REGISTRY[cls.kind][cls.name] = cls
    return cls


def _check_params_class(cls: type[Component], where: str) -> None:
    if cls.kind == "select" and "size" not in {f.name for f in dataclasses.fields(cls.Params)}:
        raise TypeError(f"{where}: a selection's Params need a `size` field (L, the most genes per sentence)")


def forget_module(module_name: str) -> list[str]:
    """Drop the components that module ``module_name`` registered (before importing a changed
    version of it, or after a test); return their names."""
    dropped = []
    for kind in KINDS:
        for name, cls in list(_REGISTRY[kind].items()):
            if cls.__module__ == module_name:
                del _REGISTRY[kind][name]
                dropped.append(name)
    return dropped


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def registered(kind: str) -> dict[str, type[Component]]:
    """The registered components of ``kind``, by name, in registration order."""
    _load_builtins()
    return dict(_REGISTRY[kind])


def _load_builtins() -> None:
    import tokbench.tokenizers.parts  # noqa: F401  (registers the built-in components)


# ----------------------------------------------------------------------------------------
# Names to classes


def lookup(kind: str, name: Any, where: str) -> type[Component]:
    """The component class a config names: a registered name or an import path ``module:Class``.

    ``where`` is the config path for messages (``fc.order``). Raises TokbenchError listing
    the valid names for an unknown one, and saying what went wrong for an import path.
    """
    _load_builtins()
    if not isinstance(name, str) or not name:
        raise TokbenchError(f"{where}.name: expected the name of a {TITLES[kind]} (got {name!r}); "
                            f"valid: {', '.join(_REGISTRY[kind])}")
    if ":" in name:
        cls = _import_class(name, f"{where}.name")
        base = _bases()[kind]
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise TokbenchError(f"{where}.name={name}: {cls!r} is not a subclass of "
                                f"tokbench.tokenizers.parts.{base.__name__} (the base of every {TITLES[kind]})")
        if not cls.description:
            raise TokbenchError(f"{where}.name={name}: set a one-line `description` on the class")
        if not dataclasses.is_dataclass(cls.Params):
            raise TokbenchError(f"{where}.name={name}: `Params` must be a dataclass")
        try:
            _check_params_class(cls, f"{where}.name={name}")
        except TypeError as err:
            raise TokbenchError(str(err)) from None
        return cls
    if name not in _REGISTRY[kind]:
        raise TokbenchError(f"{where}.name={name!r}: no such {TITLES[kind]}; valid: "
                            f"{', '.join(_REGISTRY[kind])} (or a class of your own as module:Class)")
    return _REGISTRY[kind][name]


def _bases():
    from tokbench.tokenizers import parts

    return {"fg": parts.GeneEncoder, "fe": parts.ExpressionEncoder, "order": parts.Order,
            "select": parts.Select, "combine": parts.Combine}



def _import_class(path: str, where: str) -> type:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise TokbenchError(f"{where}={path!r}: expected module:Class, e.g. my_tokenizers:LogBinFe")
    module = import_plugin(module_name, where)
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            names = ", ".join(n for n in dir(module) if isinstance(getattr(module, n), type)
                              and issubclass(getattr(module, n), Component) and getattr(module, n).__module__
                              == module.__name__)
            raise TokbenchError(f"{where}={path!r}: module {module_name} ({_origin(module)}) has no {attr!r}"
                                + (f"; its components: {names}" if names else ""))
        target = getattr(target, part)
    return target


# ----------------------------------------------------------------------------------------
# Plugins: user modules


def plugin_search_path(folders: Iterable[str | Path]) -> None:
    """Let plugin modules be found in ``folders`` (an experiment's folder, the working
    directory): they go to the front of ``sys.path`` once."""
    for folder in folders:
        text = str(Path(folder).resolve())
        if text not in sys.path:
            sys.path.insert(0, text)


def module_name_of(entry: str, base: Optional[Path] = None) -> str:
    """The module name of a ``plugins:`` entry: a dotted module name as it is, a ``.py`` file
    (relative to ``base``) as its stem, with its folder made importable."""
    if entry.endswith(".py") or "/" in entry or "\\" in entry:
        path = Path(entry).expanduser()
        if not path.is_absolute() and base is not None:
            path = base / path
        if not path.exists():
            raise TokbenchError(f"plugins: {entry}: no such file (looked for {path})")
        if path.is_dir():
            plugin_search_path([path.parent])
            return path.name
        plugin_search_path([path.parent])
        return path.stem
    return entry


def import_plugin(module_name: str, where: str = "plugins") -> ModuleType:
    """Import a user module, with a message that names it and the folders searched."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.split(".")[0] != err.name.split(".")[0] and err.name != module_name:
            raise TokbenchError(f"{where}: importing {module_name} failed: it needs {err.name}, which is not "
                                "installed") from None
        raise TokbenchError(f"{where}: no module {module_name!r} on the search path (the experiment's folder, "
                            f"the working directory, then sys.path: {', '.join(sys.path[:4])}, ...); give a "
                            "file path under plugins: or install the module") from None
    except TokbenchError:
        raise
    except Exception as err:  # a user's module may raise anything at import
        raise TokbenchError(f"{where}: importing {module_name} raised {type(err).__name__}: {err}") from err


def load_plugins(entries: Sequence[str], base: Optional[Path] = None) -> list[str]:
    """Import every ``plugins:`` entry (module names or ``.py`` files/package folders relative to
    ``base``); return their module names."""
    names = []
    for entry in entries:
        name = module_name_of(str(entry), base)
        import_plugin(name, f"plugins: {entry}")
        names.append(name)
    return names


def _origin(module: ModuleType) -> str:
    return getattr(module, "__file__", None) or "built in"


@dataclass(frozen=True)
class PluginSource:
    """Where a user module's code lives: ``module`` (top-level name), ``path`` (its file, or
    its package folder), ``files`` (the .py files, relative to ``path``'s parent) and their
    ``sha256`` (over names and contents, in sorted order)."""

    module: str
    path: Path
    files: tuple[str, ...]
    sha256: str


def plugin_source(module_name: str) -> Optional[PluginSource]:
    """The source of the top-level module of ``module_name``, or None for a module that is
    part of tokbench or installed in this Python's own folders (the node image has it)."""
    top = module_name.split(".")[0]
    module = sys.modules.get(top) or import_plugin(top)
    origin = getattr(module, "__file__", None)
    if top == "tokbench" or origin is None:
        return None
    origin_path = Path(origin).resolve()
    if any(origin_path.is_relative_to(Path(p).resolve()) for p in {sys.prefix, sys.base_prefix}):
        return None
    if origin_path.name == "__init__.py":
        path = origin_path.parent
        files = sorted(str(p.relative_to(path.parent)) for p in path.rglob("*.py") if "__pycache__" not in p.parts)
    else:
        path, files = origin_path, [origin_path.name]
    digest = hashlib.sha256()
    for name in files:
        digest.update(name.encode() + b"\0" + (path.parent / name).read_bytes() + b"\0")
    return PluginSource(top, path, tuple(files), digest.hexdigest())


def user_modules(config_names: Iterable[str], plugins: Iterable[str]) -> list[str]:
    """Top-level modules behind a config's import-path names and its plugins, in first-seen order."""
    out: list[str] = []
    for name in [*plugins, *(n.partition(":")[0] for n in config_names if isinstance(n, str) and ":" in n)]:
        top = name.split(".")[0]
        if top not in out:
            out.append(top)
    return out


# ----------------------------------------------------------------------------------------
# Configs to parameters


def parse(kind: str, section: Any, where: Optional[str] = None) -> tuple[type[Component], Any]:
    """``(component class, Params instance)`` of one config section ``{name: ..., **params}``.

    Every parameter is type-checked against the component's ``Params`` and checked against
    its range or choices; unknown keys, missing required ones and bad values raise
    TokbenchError naming ``where.key``, what was expected and the valid keys.
    """
    where = where or CONFIG_PATH[kind]
    if isinstance(section, DictConfig):
        section = OmegaConf.to_container(section, resolve=True)
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise TokbenchError(f"{where}: expected a mapping {{name: ..., ...}} (got {section!r})")
    section = dict(section)
    default_name = DEFAULT_NAMES[kind]
    cls = lookup(kind, section.pop("name", default_name) or default_name, where)
    fields = {f.name: f for f in dataclasses.fields(cls.Params)}
    for key, value in section.items():
        if key not in fields and value is not None:  # None clears a leftover (fc.order.normalize_by_median=null)
            takes = ", ".join(fields) or "no parameters"
            raise TokbenchError(f"{where}: {cls.label()!r} does not take {key!r} (set to {value!r}); "
                                f"it takes: {takes}")
    given = {k: v for k, v in section.items() if k in fields and v is not None and v != "???"}
    for name, f in fields.items():
        if name not in given and f.default is MISSING and f.default_factory is MISSING:
            help_text = f.metadata.get("help", "")
            raise TokbenchError(f"{where}: {cls.label()!r} needs {where}.{name}=..."
                                + (f" ({help_text})" if help_text else ""))
    try:
        typed = OmegaConf.merge(OmegaConf.structured(cls.Params), given)
        params = OmegaConf.to_object(typed)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        expected = fields[key].type if key in fields else "?"
        raise TokbenchError(f"{where}.{key}: {str(err).splitlines()[0]} (expected {expected})") from None
    for name, f in fields.items():
        _check_value(getattr(params, name), f, f"{where}.{name}")
    component = cls(params)
    component.check(where)
    return cls, params


def _check_value(value: Any, f: dataclasses.Field, key: str) -> None:
    low, high, choices = f.metadata.get("low"), f.metadata.get("high"), f.metadata.get("choices")
    if value is None:
        return
    if choices is not None and value not in choices:
        raise TokbenchError(f"{key}={value!r} is not valid; valid: {', '.join(map(str, choices))}")
    if low is not None and value < low:
        raise TokbenchError(f"{key} must be >= {low:g} (got {value})")
    if high is not None and value > high:
        raise TokbenchError(f"{key} must be <= {high:g} (got {value})")


def build(kind: str, section: Any, where: Optional[str] = None) -> Component:
    """An instance of the component a config section names, with its checked parameters."""
    cls, params = parse(kind, section, where)
    return cls(params)


def params_dict(params: Any) -> dict[str, Any]:
    """A Params instance as a flat mapping (for tags, MLflow params and the catalogue)."""
    return {f.name: getattr(params, f.name) for f in dataclasses.fields(params)}


def param_help(cls: type[Component]) -> list[tuple[str, Any, str]]:
    """``(name, default or MISSING, help)`` of each parameter of a component class."""
    out = []
    for f in dataclasses.fields(cls.Params):
        default = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else MISSING)
        out.append((f.name, default, f.metadata.get("help", "")))
    return out


DEFAULT_NAMES = {"fg": "learned", "fe": "zero", "order": "expression", "select": "truncate", "combine": "sum"}
