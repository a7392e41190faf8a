"""Typed configuration of the cell-classifier transformer (OmegaConf structured config)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from tokbench.errors import TokbenchError

POOLINGS = ("cls", "mean")
POS_ENCODINGS = ("learned", "sincos", "none")


@dataclass
class ModelConfig:
    """Shape of the transformer encoder that reads cell sentences.

    ``d_model`` must equal the tokenizer's embedding width and be divisible by ``n_heads``.
    The MLP hidden width is ``mlp_ratio * d_model``. ``dropout`` applies to the residual
    branches (the tutorial's hidden dropout); ``attention_dropout`` to attention
    probabilities, off by default because on a CPU it forces SDPA's unfused path (about 6x
    slower at 1,000 tokens). ``pooling``: ``cls`` reads position 0
    (the CLS token), ``mean`` averages every non-pad position (CLS included).
    ``pos_encoding`` is added to the tokenizer's embeddings: ``learned`` (BERT-style, one
    vector per position up to ``max_positions``), ``sincos`` (fixed sinusoids) or ``none``
    (the encoder then sees a set, not a sequence). ``max_positions`` bounds the sentence
    length (CLS and special tokens included) for every encoding.
    """

    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.1
    attention_dropout: float = 0.0
    pooling: str = "cls"
    pos_encoding: str = "learned"
    max_positions: int = 4096


def check_choice(value: Any, choices: Sequence[str], key: str) -> None:
    """Raise ``TokbenchError`` naming ``key`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise TokbenchError(f"{key}: {value!r} is not valid; choose one of {', '.join(map(repr, choices))}")


def check_range(value: Any, key: str, *, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False, integer: bool = False) -> None:
    """Raise ``TokbenchError`` naming ``key`` unless ``low <= value <= high`` (open ends if asked)."""
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise TokbenchError(f"{key}: expected {kind}, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise TokbenchError(f"{key}: {value!r} must be {'>' if low_open else '>='} {low}")
    if high is not None and (value >= high if high_open else value > high):
        raise TokbenchError(f"{key}: {value!r} must be {'<' if high_open else '<='} {high}")


def validate_model_config(cfg: ModelConfig, key: str = "model") -> None:
    """Check a ``ModelConfig`` (dataclass or DictConfig) before anything is built.

    Raises ``TokbenchError`` whose message starts with the offending key path, e.g.
    ``model.n_heads: d_model 130 is not divisible by n_heads 4``.
    """
    check_range(cfg.d_model, f"{key}.d_model", low=1, integer=True)
    check_range(cfg.n_heads, f"{key}.n_heads", low=1, integer=True)
    if cfg.d_model % cfg.n_heads:
        raise TokbenchError(
            f"{key}.n_heads: d_model {cfg.d_model} is not divisible by n_heads {cfg.n_heads}; "
            f"pick n_heads among the divisors of d_model"
        )
    check_range(cfg.n_layers, f"{key}.n_layers", low=1, integer=True)
    check_range(cfg.mlp_ratio, f"{key}.mlp_ratio", low=1, integer=True)
    check_range(cfg.dropout, f"{key}.dropout", low=0.0, high=1.0, high_open=True)
    check_range(cfg.attention_dropout, f"{key}.attention_dropout", low=0.0, high=1.0, high_open=True)
    check_choice(cfg.pooling, POOLINGS, f"{key}.pooling")
    check_choice(cfg.pos_encoding, POS_ENCODINGS, f"{key}.pos_encoding")
    check_range(cfg.max_positions, f"{key}.max_positions", low=1, integer=True)
