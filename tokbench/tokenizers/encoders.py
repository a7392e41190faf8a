"""The trainable side of a tokenizer: Fg and Fe modules and the embedder that combines them.

Every forward takes a :class:`CellSentences` already on the model's device and maps it to
float (B, T, d_model) with tensor operations only (no host synchronisation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokbench.tokenizers.base import PAD, CellSentences


class LearnedGenes(nn.Module):
    """Fg ``learned``: one trainable vector per token id (specials, genes, chromosome tokens)."""

    def __init__(self, vocab_size: int, d_model: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_model, padding_idx=PAD)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embedding(tokens)


class PretrainedGenes(nn.Module):
    """Fg ``pretrained``: file vectors (optionally frozen) projected to d_model.

    ``vectors`` (vocab, k) holds a row for every token id; ``has_vector`` marks the tokens
    whose row came from the file. Every other token (specials, chromosome tokens, genes
    the file lacks under ``missing: learn``) uses a trainable d_model vector. The
    projection ``Linear(k, d_model)`` exists when k != d_model and always trains.
    """

    def __init__(self, vectors: torch.Tensor, has_vector: torch.Tensor, d_model: int, frozen: bool):
        super().__init__()
        vocab_size, dim = vectors.shape
        self.learned = nn.Embedding(vocab_size, d_model, padding_idx=PAD)
        if frozen:
            self.register_buffer("vectors", vectors)
        else:
            self.vectors = nn.Parameter(vectors)
        self.register_buffer("has_vector", has_vector)
        self.project = nn.Linear(dim, d_model) if dim != d_model else nn.Identity()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # Project the (vocab, k) table once rather than every (B, T) token.
        table = torch.where(self.has_vector[:, None], self.project(self.vectors), self.learned.weight)
        return F.embedding(tokens, table)


class LinearExpression(nn.Module):
    """Fe ``linear``: w * x + b."""

    def __init__(self, d_model: int):
        super().__init__()
        self.linear = nn.Linear(1, d_model)

    def forward(self, sentences: CellSentences) -> torch.Tensor:
        return self.linear(sentences.expression.unsqueeze(-1))


class MlpExpression(nn.Module):
    """Fe ``mlp``: Linear(1, hidden) -> GELU -> Linear(hidden, d_model)."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(1, hidden), nn.GELU(), nn.Linear(hidden, d_model))

    def forward(self, sentences: CellSentences) -> torch.Tensor:
        return self.mlp(sentences.expression.unsqueeze(-1))


class BinnedExpression(nn.Module):
    """Fe ``bin_scbert`` / ``bin_scgpt``: an embedding of the bin id (scGPT adds a LayerNorm)."""

    def __init__(self, n_ids: int, d_model: int, layer_norm: bool):
        super().__init__()
        self.embedding = nn.Embedding(n_ids, d_model)
        self.norm = nn.LayerNorm(d_model) if layer_norm else nn.Identity()

    def forward(self, sentences: CellSentences) -> torch.Tensor:
        if sentences.expression_bins is None:
            raise ValueError("binned expression encoder needs CellSentences.expression_bins")
        return self.norm(self.embedding(sentences.expression_bins))


class AutoBinExpression(nn.Module):
    """Fe ``autobin`` (scFoundation's auto-discretisation).

    ``h = LeakyReLU(Linear(1, B)(x))``; ``w = softmax(alpha * h + Linear(B, B)(h))``; the
    output is ``w @ bins`` with B learned bin vectors of size d_model.
    """

    def __init__(self, d_model: int, n_bins: int, alpha: float):
        super().__init__()
        self.lift = nn.Linear(1, n_bins)
        self.mix = nn.Linear(n_bins, n_bins)
        self.bins = nn.Parameter(torch.randn(n_bins, d_model))
        self.alpha = alpha

    def forward(self, sentences: CellSentences) -> torch.Tensor:
        h = F.leaky_relu(self.lift(sentences.expression.unsqueeze(-1)), 0.1)
        weights = torch.softmax(self.alpha * h + self.mix(h), dim=-1)
        return weights @ self.bins


class CellEmbedder(nn.Module):
    """Token embeddings of a batch of cell sentences: Fg and Fe joined by the Fc's combine.

    ``combine`` is the module of the Fc's combine rule (``forward(genes, expression)``);
    ``uses_expression`` False skips the Fe. The expression vector is zero at special
    tokens, so CLS, PAD and chromosome tokens only carry their Fg vector. Output: float
    (B, T, d_model).
    """

    def __init__(self, genes: nn.Module, expression: nn.Module | None, combine: nn.Module,
                 uses_expression: bool = True):
        super().__init__()
        self.genes, self.expression, self.combine = genes, expression, combine
        self.uses_expression = uses_expression

    def forward(self, sentences: CellSentences) -> torch.Tensor:
        genes = self.genes(sentences.gene_tokens)
        if self.expression is None or not self.uses_expression:
            expression = None
        else:
            expression = self.expression(sentences).masked_fill(sentences.special.unsqueeze(-1), 0.0)
        return self.combine(genes, expression)
