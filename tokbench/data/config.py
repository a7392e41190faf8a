"""Typed configuration of the data layer (OmegaConf structured configs)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING


@dataclass
class DatasetConfig:
    """Where the cells come from and how they are preprocessed.

    ``path`` is an ``.h5ad`` file. Counts come from ``X`` or ``layers[layer]``; gene ids
    from ``var_names`` or ``var[gene_key]``; labels from ``obs[label_key]``.
    Preprocessing is scanpy's ``normalize_total(target_sum)`` then ``log1p``, optionally
    restricted to the ``n_top_genes`` highly variable genes of the *training* cells.
    """

    path: str = MISSING
    name: str = ""
    layer: Optional[str] = None
    gene_key: Optional[str] = None
    label_key: str = "cell_type"
    target_sum: float = 1e4
    log1p: bool = True
    n_top_genes: Optional[int] = None
    min_cells: int = 1
    min_gene_fraction_mapped: float = 0.5
    cache_dir: str = ""
    chunk_size: int = 8192


@dataclass
class SplitConfig:
    """How cells are divided into train / val / test.

    ``kind``:
      - ``predefined``: ``obs[key]`` holds the split; ``train``/``val``/``test`` list its values.
      - ``cross_tissue``: ``obs[key]`` holds the tissue; ``train`` lists training tissues,
        ``test`` the held-out ones; validation is ``val_fraction`` of the cells of the
        tissues named by ``val_from``, stratified by label: ``train`` (the training tissues;
        the held-out tissue is never seen, not even for early stopping) or ``test`` (the
        held-out tissues, disjoint from the test cells: the Heimdall tutorial's protocol,
        where model selection and early stopping look at the target tissue). An explicit
        ``val`` list of tissues replaces both.
      - ``random``: stratified by label, ``val_fraction`` and ``test_fraction`` of all cells.
    """

    kind: str = "cross_tissue"
    key: Optional[str] = "tissue"
    train: list[str] = field(default_factory=list)
    val: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)
    val_fraction: float = 0.1
    val_from: str = "train"
    test_fraction: float = 0.2
    seed: int = 0
