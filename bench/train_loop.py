"""Throughput of the annotation training loop: cells/s, tokens/s, padding and data share.

    python bench/train_loop.py                                  # CPU-sized defaults
    python bench/train_loop.py --n-cells 50000 --max-length 2048 --device cuda

Random cells with a long-tailed number of expressed genes (so sentence lengths vary the way
they do in real atlases) are tokenised by a vectorised top-k-by-expression stand-in
tokenizer (a Geneformer-like Fc with a learned Fg and linear Fe), then one epoch is
trained with and without length bucketing. One JSON line per setting goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import tempfile

import numpy as np
import pandas as pd
import torch
from torch import nn

from tokbench.data.prepared import PreparedData
from tokbench.model import ModelConfig
from tokbench.tokenizers.base import CLS, N_SPECIAL, PAD, CellSentences
from tokbench.training import AnnotationTrainer, OptimizerConfig, SchedulerConfig, TrainerConfig


def random_cells(n_cells: int, n_genes: int, n_classes: int, seed: int = 0) -> PreparedData:
    """Cells with log-normally distributed gene counts (median ~ n_genes / 20) and random values."""
    rng = np.random.default_rng(seed)
    nnz = np.clip(rng.lognormal(np.log(n_genes / 20), 0.6, n_cells).astype(np.int64), 5, n_genes)
    indptr = np.concatenate([[0], np.cumsum(nnz)])
    indices = np.concatenate([np.sort(rng.choice(n_genes, k, replace=False)) for k in nnz]).astype(np.int32)
    data = rng.gamma(2.0, 0.7, indptr[-1]).astype(np.float32)
    split = rng.choice(np.array([0, 1, 2], dtype=np.int8), n_cells, p=[0.8, 0.1, 0.1])
    ids = np.array([f"G{j}" for j in range(n_genes)])
    return PreparedData(indptr=indptr, indices=indices, data=data, gene_ids=ids, gene_symbols=ids,
                        gene_chromosome=np.array([""] * n_genes), gene_start=np.full(n_genes, -1),
                        labels=rng.integers(0, n_classes, n_cells), class_names=[f"t{c}" for c in range(n_classes)],
                        split=split, obs=pd.DataFrame(index=np.arange(n_cells)))


class Embedder(nn.Module):
    def __init__(self, n_genes: int, d_model: int):
        super().__init__()
        self.gene = nn.Embedding(N_SPECIAL + n_genes, d_model)
        self.expression = nn.Linear(1, d_model)

    def forward(self, s: CellSentences) -> torch.Tensor:
        return self.gene(s.gene_tokens) + self.expression(s.expression.unsqueeze(-1)) * (~s.special).unsqueeze(-1)


class TopKTokenizer:
    """CLS + the ``max_length`` most expressed genes, descending; built on the target device."""

    def __init__(self, data: PreparedData, d_model: int, max_length: int):
        self.data, self.max_length = data, max_length
        self.embedder = Embedder(data.n_genes, d_model)

    def sentences(self, cells: np.ndarray, epoch: int, device="cpu") -> CellSentences:
        indptr, genes, values = self.data.rows(cells)
        lengths = np.diff(indptr)
        B, W = len(cells), int(lengths.max())
        row = torch.from_numpy(np.repeat(np.arange(B), lengths)).to(device)
        col = torch.from_numpy(np.arange(indptr[-1]) - np.repeat(indptr[:-1], lengths)).to(device)
        dense_values = torch.full((B, W), -1.0, device=device)
        dense_genes = torch.zeros((B, W), dtype=torch.long, device=device)
        dense_values[row, col] = torch.from_numpy(values).to(device)
        dense_genes[row, col] = torch.from_numpy(genes.astype(np.int64)).to(device)
        top_values, where = dense_values.topk(min(self.max_length, W), dim=1)
        T = 1 + min(self.max_length, W)
        keep = top_values >= 0
        tokens = torch.full((B, T), PAD, dtype=torch.long, device=device)
        tokens[:, 0] = CLS
        tokens[:, 1:] = torch.where(keep, N_SPECIAL + dense_genes.gather(1, where), PAD)
        expression = torch.zeros((B, T), device=device)
        expression[:, 1:] = torch.where(keep, top_values, 0.0)
        return CellSentences(tokens, expression, special=tokens < N_SPECIAL, padding_mask=tokens == PAD)

    def describe(self) -> dict[str, str]:
        return {"fg": "learned", "fe": "linear", "fc": "topk"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-cells", type=int, default=4000)
    parser.add_argument("--n-genes", type=int, default=4000)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--num-workers", type=int, default=0)
    args = parser.parse_args()

    data = random_cells(args.n_cells, args.n_genes, n_classes=10)
    model_cfg = ModelConfig(d_model=args.d_model, max_positions=args.max_length + 1)
    for bucket in (False, True):
        torch.manual_seed(0)
        tokenizer = TopKTokenizer(data, args.d_model, args.max_length)
        trainer_cfg = TrainerConfig(batch_size=args.batch_size, max_epochs=1, device=args.device,
                                    bucket_by_length=bucket, num_workers=args.num_workers)
        with tempfile.TemporaryDirectory() as run_dir:
            trainer = AnnotationTrainer(data, tokenizer, model_cfg, OptimizerConfig(), SchedulerConfig(), trainer_cfg, run_dir)
            metrics = trainer.step()
        keys = ("cells_per_second", "tokens_per_second", "padded_fraction", "data_fraction", "train_seconds", "epoch_seconds")
        print(json.dumps({"bucket_by_length": bucket, "device": str(trainer.device), "bf16": trainer.use_amp,
                          **{k: round(metrics[k], 4) for k in keys}}))


if __name__ == "__main__":
    main()
