"""Single-cell tokenizers as three parts: Fg (gene identity), Fe (expression), Fc (cell constructor).

``build_tokenizer(fg, fe, fc, data, d_model, seed)`` assembles one from three configs;
``load_component(group, name)`` reads a preset (``tokbench/configs/{fg,fe,fc}/NAME.yaml``);
``catalogue()`` lists every part and preset on one screen.
"""

from tokbench.tokenizers.base import CHROM_END, CLS, MASK, N_SPECIAL, PAD, CellSentences, Tokenizer
from tokbench.tokenizers.config import (
    CombineConfig,
    FcConfig,
    FeConfig,
    FgConfig,
    OrderConfig,
    SelectConfig,
    load_component,
)
from tokbench.tokenizers.tokenizer import CellTokenizer, build_tokenizer, catalogue

__all__ = [
    "CHROM_END",
    "CLS",
    "MASK",
    "N_SPECIAL",
    "PAD",
    "CellSentences",
    "CellTokenizer",
    "CombineConfig",
    "FcConfig",
    "FeConfig",
    "FgConfig",
    "OrderConfig",
    "SelectConfig",
    "Tokenizer",
    "build_tokenizer",
    "catalogue",
    "load_component",
]
