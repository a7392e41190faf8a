"""tokbench: benchmark single-cell tokenizers across tissues."""

from importlib import metadata

from tokbench.errors import TokbenchError

try:
    # pyproject.toml holds the one version number; the installed distribution's metadata carries it.
    __version__ = metadata.version("tokbench")
except metadata.PackageNotFoundError:  # a source tree on sys.path that was never pip-installed
    __version__ = "0+unknown"
__all__ = ["TokbenchError", "__version__"]
