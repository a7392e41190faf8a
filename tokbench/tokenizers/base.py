"""The contract between a tokenizer and the model: a padded batch of cell sentences."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional, Protocol

import numpy as np
import torch
from torch import nn

# Special tokens occupy the first ids of the gene-token vocabulary; gene j of the dataset
# is token N_SPECIAL + j. Chromosome tokens (UCE) follow the genes, see the Fc docs.
PAD, CLS, MASK, CHROM_END = 0, 1, 2, 3
N_SPECIAL = 4


@dataclass
class CellSentences:
    """A batch of cell sentences, padded to its longest sentence (not to ``max_length``).

    Position 0 of every sentence is CLS. ``gene_tokens`` are token ids (special tokens
    below ``N_SPECIAL``); ``expression`` is the log-normalised value of each gene token and
    0.0 at special tokens; ``expression_bins`` (present only when the Fe uses bins) is the
    bin id of each token, 0 at special tokens; ``special`` is True at special tokens
    (CLS, PAD, chromosome tokens) so no expression value is ever read at them;
    ``padding_mask`` is True at PAD positions.
    """

    gene_tokens: torch.Tensor  # int64 (B, T)
    expression: torch.Tensor  # float32 (B, T)
    special: torch.Tensor  # bool (B, T)
    padding_mask: torch.Tensor  # bool (B, T)
    expression_bins: Optional[torch.Tensor] = None  # int64 (B, T)

    def to(self, device: torch.device | str, non_blocking: bool = True) -> "CellSentences":
        """Copy every tensor to ``device`` (non-blocking from pinned memory)."""
        moved = {
            f.name: (None if (t := getattr(self, f.name)) is None else t.to(device, non_blocking=non_blocking))
            for f in fields(self)
        }
        return CellSentences(**moved)

    def pin_memory(self) -> "CellSentences":
        """Pin every tensor so host-to-GPU copies can overlap compute."""
        return CellSentences(**{f.name: (None if (t := getattr(self, f.name)) is None else t.pin_memory()) for f in fields(self)})

    @property
    def padded_fraction(self) -> float:
        """Fraction of positions in the batch that are padding (0..1)."""
        return float(self.padding_mask.float().mean()) if self.padding_mask.numel() else 0.0


class Tokenizer(Protocol):
    """What the training loop needs from a tokenizer (built by ``tokbench.tokenizers.build_tokenizer``)."""

    embedder: nn.Module  # forward(CellSentences) -> float (B, T, d_model)

    def sentences(self, cells: np.ndarray, epoch: int, device: torch.device | str = "cpu") -> CellSentences:
        """Tokenise the cells with these row indices; random choices depend only on (seed, epoch, cell)."""
        ...

    def describe(self) -> dict[str, str]:
        """Tags naming the tokenizer parts: ``fg``, ``fe``, ``fc``, ``order``, ``select``, ``combine``, ``preset``."""
        ...
