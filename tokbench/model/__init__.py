"""The sequence model: a transformer encoder over cell sentences with a classification head."""

from tokbench.model.config import ModelConfig, validate_model_config
from tokbench.model.transformer import CellClassifier, TransformerEncoder, pool

__all__ = ["CellClassifier", "ModelConfig", "TransformerEncoder", "pool", "validate_model_config"]
