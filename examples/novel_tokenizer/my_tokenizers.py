"""Three tokenizer parts of one's own, each a class in this module (docs/novel_tokenizer.md).

- ``LogBinFe`` (Fe): soft bins on log(x + c), the offset c learned with the model.
- ``VarianceOrder`` (order): genes by their variance over the training cells, most variable
  first.
- ``UnitVectorsFg`` (Fg): gene vectors from a ``{symbol: vector}`` file, scaled to unit length.

``@register`` gives each a short name once this module is listed under ``plugins:``; without
that, a config can still name a class by import path (``fe: {name: my_tokenizers:LogBinFe}``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tokbench.errors import TokbenchError
from tokbench.tokenizers.encoders import PretrainedGenes
from tokbench.tokenizers.parts import (
    BuildContext,
    Entries,
    ExpressionEncoder,
    GeneEncoder,
    Order,
    descending,
    gene_table,
    param,
    register,
)

# ----------------------------------------------------------------------------------------
# An expression encoder: soft log-scale bins with a learned offset


class _LogBins(nn.Module):
    """z = log(x + c) with c = softplus(offset) > 0, softly assigned to ``n_bins`` learned
    vectors at evenly spaced centres: weights = softmax(-(z - centre)^2 / width^2)."""

    def __init__(self, d_model: int, n_bins: int, max_value: float, init_offset: float):
        super().__init__()
        # softplus^-1(init_offset): the offset starts where the parameter says
        self.offset = nn.Parameter(torch.tensor(math.log(math.expm1(init_offset))))
        self.bins = nn.Parameter(torch.randn(n_bins, d_model) * d_model**-0.5)
        self.register_buffer("centres", torch.linspace(0.0, 1.0, n_bins))
        self.max_value, self.width = max_value, 1.0 / n_bins

    def forward(self, sentences) -> torch.Tensor:
        c = F.softplus(self.offset)
        low, high = torch.log(c), torch.log(c + self.max_value)
        z = (torch.log(sentences.expression.clamp(min=0.0) + c) - low) / (high - low)  # 0..1
        weights = torch.softmax(-((z.unsqueeze(-1) - self.centres) ** 2) / self.width**2, dim=-1)
        return weights @ self.bins


@dataclass
class LogBinParams:
    n_bins: int = param(10, "number of bin vectors", low=2)
    max_value: float = param(8.0, "largest log-normalised value the bins span", low=1e-3)
    init_offset: float = param(0.1, "starting value of the learned offset c", low=1e-4)


@register
class LogBinFe(ExpressionEncoder):
    name = "log_bins"
    description = "soft bins on log(x + c), the offset c learned"
    reference = "examples/novel_tokenizer (a tutorial part, no published model)"
    Params = LogBinParams

    def build(self, ctx: BuildContext) -> nn.Module:
        p = self.params
        return _LogBins(ctx.d_model, p.n_bins, p.max_value, p.init_offset)


# ----------------------------------------------------------------------------------------
# An order: most variable genes first


@register
class VarianceOrder(Order):
    name = "variance"
    description = "genes by variance over the training cells, most variable first"
    reference = "examples/novel_tokenizer (a tutorial part, no published model)"

    def setup(self, ctx: BuildContext) -> None:
        x = ctx.train_matrix()
        mean = np.asarray(x.mean(axis=0)).ravel()
        mean_sq = np.asarray(x.multiply(x).mean(axis=0)).ravel()
        self.variance = torch.as_tensor(np.maximum(mean_sq - mean**2, 0.0), dtype=torch.float32)

    def rank(self, entries: Entries) -> torch.Tensor:
        # one rank per entry, from the entry alone (its gene): the same on every device
        variance = self.variance.to(entries.device)
        return descending(variance[entries.gene])


# ----------------------------------------------------------------------------------------
# A gene identity encoder: unit-length vectors from a {gene symbol: vector} file


@dataclass
class UnitVectorsParams:
    path: str = param(help="torch file holding {gene symbol: 1-D tensor} (GenePT's and the atlas's layout)")
    frozen: bool = param(True, "keep the file's vectors fixed (the projection to d_model trains)")


@register
class UnitVectorsFg(GeneEncoder):
    name = "unit_vectors"
    description = "gene vectors from a {symbol: vector} file, each scaled to unit length"
    reference = "examples/novel_tokenizer (a tutorial part)"
    Params = UnitVectorsParams

    def build(self, ctx: BuildContext):
        table = torch.load(self.params.path, map_location="cpu")
        by_symbol = {str(k).upper(): v.float() for k, v in table.items()}
        symbols = [str(s).upper() for s in ctx.data.gene_symbols]
        genes = np.array([j for j, s in enumerate(symbols) if s in by_symbol], dtype=np.int64)
        if len(genes) == 0:
            raise TokbenchError(f"fg.path {self.params.path}: no gene of the dataset has a vector there "
                                f"(dataset symbols look like {', '.join(symbols[:3])})")
        vectors = torch.stack([by_symbol[symbols[j]] for j in genes])
        vectors = F.normalize(vectors, dim=1).numpy()
        weights, has_vector = gene_table(ctx, genes, vectors)
        # genes without a vector (and the special tokens) get trainable vectors
        module = PretrainedGenes(weights, has_vector, ctx.d_model, frozen=self.params.frozen)
        return module, None, len(genes)
