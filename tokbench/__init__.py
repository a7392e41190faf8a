"""tokbench: benchmark single-cell tokenizers across tissues."""

from tokbench.errors import TokbenchError

__version__ = "0.1.0"
__all__ = ["TokbenchError", "__version__"]
