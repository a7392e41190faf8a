"""A seeded synthetic cross-tissue single-cell atlas, so the cross-tissue question is real.

Counts are negative binomial (gamma-Poisson). The mean of gene g in a cell of type k from
tissue t is the cell's library size times a softmax over genes of

    baseline[g] + lineage[k, g] + type[k, g] + tissue[t, g] + interaction[k, t, g] + log capture[t, g]

All effects are natural-log fold changes. Cell-type markers and lineage markers (shared by
sibling types such as T and NK cells) are the same in every tissue; tissue programs shift
every type of a tissue; type x tissue interactions silence some markers of a type in one
tissue and move other genes, so a classifier trained on some tissues transfers imperfectly.
Genes are real GRCh38 symbols from :func:`tokbench.data.genes.gene_table`.
"""

from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from tokbench.data.genes import gene_table
from tokbench.errors import TokbenchError

# Siblings sit next to each other: type 2i and 2i+1 share a lineage program.
CELL_TYPE_NAMES = ("T cell", "NK cell", "B cell", "plasma cell",
                   "monocyte", "macrophage", "fibroblast", "endothelial cell")
TISSUE_NAMES = ("blood", "lung", "gut", "brain")
CHUNK_CELLS = 4096
# Non-coding RNA families and numbered pseudogenes (RPL21P106): rarely the genes a
# tokenizer is judged on, so they are used only when clean coding-like symbols run out.
_NONCODING = re.compile(r"^(?:MIR|LINC|SNOR|SCAR|RNA5|RN7S|RNU|RNY|VTRNA|LOC)|\dP\d+$")


@dataclass(frozen=True)
class AtlasKnobs:
    """Generator settings; effects are natural-log fold changes, library sizes in UMIs.

    The defaults are calibrated (see :func:`calibrate`): within a tissue a logistic
    regression separates the types (accuracy >= 0.95); trained on three tissues and tested
    on the fourth it reaches roughly 0.6-0.85 (seeds 0-3: held-out means 0.69-0.77).
    """

    baseline_log_sd: float = 1.5  # spread of gene baseline log-abundance
    n_active_genes: int = 5000  # genes at baseline level; the rest are mostly silent
    inactive_log_shift: float = -4.0  # log-abundance offset of the silent genes
    dispersion_median: float = 4.0  # NB size (theta); smaller is noisier
    dispersion_log_sd: float = 0.5
    library_size_median: float = 6000.0  # UMIs per cell
    library_size_log_sd: float = 0.4  # within a tissue
    tissue_library_log_sd: float = 0.35  # between tissue medians
    capture_log_sd: float = 0.3  # gene-specific detection, per tissue
    n_lineage_markers: int = 15  # per sibling pair
    lineage_lfc: float = 1.2
    n_markers: int = 25  # per cell type
    marker_lfc: float = 1.5
    n_tissue_genes: int = 60  # per tissue program
    tissue_lfc: float = 1.5
    marker_loss: float = 0.64  # fraction of a type's markers silenced in each tissue
    n_interaction_genes: int = 50  # per (type, tissue), up or down
    interaction_lfc: float = 1.5  # sd of those log fold changes
    dirichlet_alpha: float = 3.0  # concentration of per-tissue type proportions
    min_cells_per_type: int = 10  # per tissue


@dataclass
class _Programs:
    """Everything drawn before cells are sampled: genes, effects, composition."""

    genes: pd.DataFrame
    cell_types: list[str]
    tissues: list[str]
    baseline: np.ndarray  # (genes,) log-abundance
    theta: np.ndarray  # (genes,) NB size
    lineage_lfc: np.ndarray  # (sibling pairs, genes); type k is in pair k // 2
    type_lfc: np.ndarray  # (types, genes)
    tissue_lfc: np.ndarray  # (tissues, genes)
    interaction_lfc: np.ndarray  # (types, tissues, genes)
    log_capture: np.ndarray  # (tissues, genes)
    library_log_median: np.ndarray  # (tissues,)
    proportions: np.ndarray  # (tissues, types)


def _names(base: tuple[str, ...], n: int, generic: str) -> list[str]:
    return [base[i] if i < len(base) else f"{generic}_{i + 1}" for i in range(n)]


def _choose_genes(n_genes: int, rng: np.random.Generator) -> pd.DataFrame:
    """``n_genes`` rows of the gene table, preferring clean symbols, in genomic order."""
    table = gene_table()
    if n_genes > len(table):
        raise TokbenchError(f"synthetic atlas: n_genes={n_genes} exceeds the {len(table)} "
                            "genes of the GRCh38 table; ask for fewer genes.")
    symbol = table["symbol"].astype(str)
    clean = symbol.str.fullmatch(r"[A-Z][A-Z0-9]*").to_numpy()
    coding_like = clean & ~symbol.str.contains(_NONCODING).to_numpy()
    # Rank: coding-like first, then other clean symbols, then the rest; random within a tier.
    tier = np.where(coding_like, 0, np.where(clean, 1, 2))
    order = np.lexsort((rng.random(len(table)), tier))
    rows = np.sort(order[:n_genes])  # the table is in genomic order
    return table.iloc[rows].reset_index(drop=True)


def _sparse_effect(rng, n_genes, candidates, size, lfc, *, sign=False) -> np.ndarray:
    """A (genes,) log-fold-change vector: ``size`` genes from ``candidates``, others 0."""
    effect = np.zeros(n_genes, dtype=np.float32)
    genes = rng.choice(candidates, size=min(size, len(candidates)), replace=False)
    if sign:
        effect[genes] = lfc * rng.normal(size=len(genes))
    else:
        # Gamma(4) sizes: every program gene moves clearly, some much more than others.
        effect[genes] = lfc * rng.gamma(4.0, 0.25, size=len(genes))
    return effect


def _draw_programs(n_genes, n_tissues, n_cell_types, k: AtlasKnobs, rng) -> _Programs:
    """Genes, their effects per lineage, type, tissue and type x tissue, and composition."""
    genes = _choose_genes(n_genes, rng)
    active = np.sort(rng.choice(n_genes, size=min(k.n_active_genes, n_genes), replace=False))
    baseline = rng.normal(0.0, k.baseline_log_sd, n_genes).astype(np.float32)
    baseline[np.setdiff1d(np.arange(n_genes), active)] += k.inactive_log_shift
    theta = (k.dispersion_median * np.exp(rng.normal(0, k.dispersion_log_sd, n_genes)))
    n_pairs = (n_cell_types + 1) // 2
    lineage = np.stack([_sparse_effect(rng, n_genes, active, k.n_lineage_markers, k.lineage_lfc)
                        for _ in range(n_pairs)])
    type_lfc = np.stack([_sparse_effect(rng, n_genes, active, k.n_markers, k.marker_lfc)
                         for _ in range(n_cell_types)])
    tissue = np.stack([_sparse_effect(rng, n_genes, active, k.n_tissue_genes, k.tissue_lfc)
                       for _ in range(n_tissues)])
    interaction = np.zeros((n_cell_types, n_tissues, n_genes), dtype=np.float32)
    for c in range(n_cell_types):
        markers = np.flatnonzero(type_lfc[c])
        for t in range(n_tissues):
            # A fixed count per (type, tissue) rather than a coin per marker: transfer then
            # varies less between seeds and held-out tissues.
            lost = rng.choice(markers, size=round(k.marker_loss * len(markers)), replace=False)
            interaction[c, t, lost] = -type_lfc[c, lost]
            interaction[c, t] += _sparse_effect(rng, n_genes, active, k.n_interaction_genes,
                                                k.interaction_lfc, sign=True)
    log_capture = rng.normal(0, k.capture_log_sd, (n_tissues, n_genes)).astype(np.float32)
    library = np.log(k.library_size_median) + rng.normal(0, k.tissue_library_log_sd, n_tissues)
    proportions = rng.dirichlet(np.full(n_cell_types, k.dirichlet_alpha), size=n_tissues)
    return _Programs(genes, _names(CELL_TYPE_NAMES, n_cell_types, "type"),
                     _names(TISSUE_NAMES, n_tissues, "tissue"), baseline, theta.astype(np.float32),
                     lineage, type_lfc, tissue, interaction, log_capture, library, proportions)


def _profiles(p: _Programs) -> np.ndarray:
    """Expected fraction of a cell's UMIs per gene, (types * tissues, genes), rows sum to 1."""
    pair = np.arange(len(p.cell_types)) // 2
    logits = (p.baseline + p.lineage_lfc[pair, None] + p.type_lfc[:, None]
              + p.tissue_lfc[None] + p.interaction_lfc + p.log_capture[None])
    logits = logits.reshape(-1, logits.shape[-1]).astype(np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    rates = np.exp(logits)
    return (rates / rates.sum(axis=1, keepdims=True)).astype(np.float32)


def _assign_cells(n_cells, p: _Programs, k: AtlasKnobs, rng) -> tuple[np.ndarray, np.ndarray]:
    """Tissue and type codes per cell: equal tissues, Dirichlet types, a floor per type."""
    n_tissues, n_types = p.proportions.shape
    per_tissue = np.full(n_tissues, n_cells // n_tissues)
    per_tissue[: n_cells % n_tissues] += 1
    floor = k.min_cells_per_type * n_types
    if per_tissue.min() < floor:
        raise TokbenchError(
            f"synthetic atlas: n_cells={n_cells} gives {per_tissue.min()} cells per tissue, "
            f"fewer than min_cells_per_type={k.min_cells_per_type} x {n_types} types; "
            "ask for more cells, fewer types or a lower min_cells_per_type.")
    tissue_code, type_code = [], []
    for t, n in enumerate(per_tissue):
        counts = k.min_cells_per_type + rng.multinomial(n - floor, p.proportions[t])
        type_code.append(rng.permutation(np.repeat(np.arange(n_types), counts)))
        tissue_code.append(np.full(n, t))
    return np.concatenate(tissue_code), np.concatenate(type_code)


def _sample_nb(mean: np.ndarray, theta: np.ndarray, rng, direct_above: float = 2.0) -> sp.csr_matrix:
    """Negative-binomial counts, as float32 CSR, for means (cells, genes) and sizes (genes,).

    Exact, and cheaper than a gamma-Poisson draw per entry: most entries of a large atlas
    have a mean far below 1, so one uniform per entry decides zero or not against
    P(0) = (1 + mean/theta)^-theta, and only the nonzero entries draw a value, from the
    zero-truncated distribution: by inverse CDF (continuing from the same uniform) where
    the mean is at most ``direct_above``, by gamma-Poisson rejection of zeros above it.
    """
    n_cells, n_genes = mean.shape
    u = rng.random(mean.shape, dtype=np.float32)
    p_zero = mean / theta  # in place from here: one chunk-sized temporary
    np.log1p(p_zero, out=p_zero)
    p_zero *= -theta
    np.exp(p_zero, out=p_zero)
    flat = np.flatnonzero(u >= p_zero)  # row-major, so already in CSR order
    m = mean.reshape(-1)[flat].astype(np.float64)
    th = theta[flat % n_genes].astype(np.float64)
    values = np.zeros(len(flat), dtype=np.float32)

    pending = np.flatnonzero(m > direct_above)
    while len(pending):
        draw = rng.poisson(m[pending] * rng.standard_gamma(th[pending]) / th[pending])
        values[pending] = draw
        pending = pending[draw == 0]

    pending = np.flatnonzero(m <= direct_above)
    uu = u.reshape(-1)[flat[pending]].astype(np.float64)
    cdf = p_zero.reshape(-1)[flat[pending]].astype(np.float64)
    pmf, q, k_th, value = cdf.copy(), m[pending] / (m[pending] + th[pending]), th[pending], 0
    while len(pending):
        value += 1
        pmf *= (value - 1 + k_th) / value * q
        cdf += pmf
        # Rounding can leave a uniform just above the total mass; the cap ends those entries.
        done = (uu < cdf) | (value >= 1000)
        values[pending[done]] = value
        keep = ~done
        pending, uu, cdf, pmf, q, k_th = (a[keep] for a in (pending, uu, cdf, pmf, q, k_th))

    rows = flat // n_genes
    indptr = np.zeros(n_cells + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n_cells), out=indptr[1:])
    indices = (flat - rows * n_genes).astype(np.int32)
    return sp.csr_matrix((values, indices, indptr), shape=mean.shape)


def _stack_rows(chunks: list[sp.csr_matrix], n_genes: int) -> sp.csr_matrix:
    """Stack CSR row blocks, emptying ``chunks`` as it goes.

    The output arrays are allocated up front but only touched chunk by chunk, and each
    chunk is freed once copied, so peak memory stays near one copy of the matrix rather
    than the two that ``scipy.sparse.vstack`` holds.
    """
    nnz = sum(c.nnz for c in chunks)
    n_cells = sum(c.shape[0] for c in chunks)
    data = np.empty(nnz, dtype=np.float32)
    indices = np.empty(nnz, dtype=np.int32 if nnz < 2**31 else np.int64)
    indptr = np.zeros(n_cells + 1, dtype=np.int64)
    row = at = 0
    chunks.reverse()
    while chunks:
        chunk = chunks.pop()
        data[at: at + chunk.nnz] = chunk.data
        indices[at: at + chunk.nnz] = chunk.indices
        indptr[row + 1: row + 1 + chunk.shape[0]] = chunk.indptr[1:] + at
        row, at = row + chunk.shape[0], at + chunk.nnz
        del chunk
    return sp.csr_matrix((data, indices, indptr), shape=(n_cells, n_genes))


def _build(n_cells, n_genes, n_tissues, n_cell_types, seed, knobs) -> tuple[ad.AnnData, _Programs]:
    """The atlas and the programs it was drawn from (the embedding file needs both)."""
    try:
        k = AtlasKnobs(**knobs)
    except TypeError as err:
        known = ", ".join(f.name for f in dataclasses.fields(AtlasKnobs))
        raise TokbenchError(f"synthetic atlas: {err}; known knobs: {known}.") from None
    root = np.random.SeedSequence(seed)
    program_seed, cell_seed, chunk_seed = root.spawn(3)
    p = _draw_programs(n_genes, n_tissues, n_cell_types, k, np.random.default_rng(program_seed))
    rng = np.random.default_rng(cell_seed)
    tissue_code, type_code = _assign_cells(n_cells, p, k, rng)
    library = np.exp(p.library_log_median[tissue_code]
                     + rng.normal(0, k.library_size_log_sd, n_cells)).astype(np.float32)
    profiles = _profiles(p)
    combo = type_code * n_tissues + tissue_code
    # Dense only per chunk, so memory stays bounded by CHUNK_CELLS x n_genes.
    starts = range(0, n_cells, CHUNK_CELLS)
    chunks = []
    for start, chunk_seq in zip(starts, chunk_seed.spawn(len(starts))):
        rows = slice(start, start + CHUNK_CELLS)
        mean = library[rows, None] * profiles[combo[rows]]  # expected UMIs, cells x genes
        chunks.append(_sample_nb(mean, p.theta, np.random.default_rng(chunk_seq)))
    n_counts = np.concatenate([np.asarray(c.sum(axis=1), dtype=np.float32).ravel() for c in chunks])
    X = _stack_rows(chunks, n_genes)
    obs = pd.DataFrame({
        "cell_type": pd.Categorical.from_codes(type_code, p.cell_types),
        "tissue": pd.Categorical.from_codes(tissue_code, p.tissues),
        "n_counts": n_counts,
    }, index=[f"cell_{i}" for i in range(n_cells)])
    var = pd.DataFrame({"ensembl_id": p.genes["ensembl_id"].to_numpy(),
                        "chromosome": p.genes["chromosome"].to_numpy(),
                        "start": p.genes["start"].to_numpy(np.int64)},
                       index=pd.Index(p.genes["symbol"].to_numpy(), name=None))
    params = {"n_cells": int(n_cells), "n_genes": int(n_genes), "n_tissues": int(n_tissues),
              "n_cell_types": int(n_cell_types), "seed": int(seed), **dataclasses.asdict(k)}
    symbols = var.index.to_numpy()
    params["marker_genes"] = {name: [str(g) for g in symbols[p.type_lfc[i] > 0]]
                              for i, name in enumerate(p.cell_types)}
    params["tissue_program_genes"] = {name: [str(g) for g in symbols[p.tissue_lfc[i] > 0]]
                                      for i, name in enumerate(p.tissues)}
    return ad.AnnData(X=X, obs=obs, var=var, uns={"synth": params}), p


def generate_atlas(n_cells: int = 6000, n_genes: int = 2000, n_tissues: int = 4,
                   n_cell_types: int = 8, seed: int = 0, **knobs) -> ad.AnnData:
    """Generate the synthetic atlas: ``n_cells`` cells x ``n_genes`` genes of raw UMI counts.

    ``X`` is a float32 CSR matrix of integer counts; ``obs`` has ``cell_type``, ``tissue``
    (categoricals) and ``n_counts`` (UMIs per cell); ``var_names`` are GRCh38 gene symbols
    with ``var`` columns ``ensembl_id``, ``chromosome``, ``start`` (bp). ``uns["synth"]``
    holds the parameters and each type's marker and each tissue's program genes. ``knobs``
    override fields of :class:`AtlasKnobs`. The same arguments give the same atlas.
    """
    return _build(n_cells, n_genes, n_tissues, n_cell_types, seed, knobs)[0]


def _gene_embeddings(p: _Programs, dim: int, seed: int, noise: float = 0.5) -> dict:
    """Per-gene float32 vectors of length ``dim`` standing in for a pretrained embedding.

    Each gene's program memberships (lineage, type marker and tissue program log fold
    changes) and standardised baseline go through one random Gaussian projection (variance
    1/2 per coordinate per unit of feature), plus Gaussian noise of sd ``noise`` per
    coordinate. Genes of one program therefore point the same way, as in a learned embedding.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7]))
    baseline = (p.baseline - p.baseline.mean()) / max(float(p.baseline.std()), 1e-6)
    features = np.concatenate([p.lineage_lfc, p.type_lfc, p.tissue_lfc, baseline[None]]).T
    projection = rng.normal(0, 1, (features.shape[1], dim)) / np.sqrt(2.0)
    vectors = (features @ projection + rng.normal(0, noise, (len(features), dim))).astype(np.float32)
    import torch  # only the embedding file needs torch

    return {g: torch.from_numpy(v.copy()) for g, v in zip(p.genes["symbol"], vectors)}


def write_atlas(out, n_cells: int = 6000, n_genes: int = 2000, n_tissues: int = 4,
                n_cell_types: int = 8, seed: int = 0, embedding_dim: int = 64, **knobs) -> dict:
    """Write the atlas to ``out`` (.h5ad) and ``<stem>.gene_embeddings.pt`` beside it.

    The embedding file is a ``torch.save``d ``{gene_symbol: float32 tensor[embedding_dim]}``
    for every gene (see :func:`_gene_embeddings`). Returns ``{"h5ad", "gene_embeddings",
    "n_cells", "n_genes", "embedding_dim", "seconds"}`` (paths as strings, wall seconds).
    """
    import torch

    started = time.perf_counter()
    out = Path(out)
    adata, programs = _build(n_cells, n_genes, n_tissues, n_cell_types, seed, knobs)
    out.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(out)
    emb_path = out.with_name(f"{out.stem}.gene_embeddings.pt")
    torch.save(_gene_embeddings(programs, embedding_dim, seed), emb_path)
    return {"h5ad": str(out), "gene_embeddings": str(emb_path), "n_cells": adata.n_obs,
            "n_genes": adata.n_vars, "embedding_dim": int(embedding_dim),
            "seconds": round(time.perf_counter() - started, 3)}


def calibrate(adata: ad.AnnData, seed: int = 0, *, label_key: str = "cell_type",
              tissue_key: str = "tissue", test_size: float = 0.3, max_iter: int = 300) -> dict:
    """Logistic-regression accuracy (0..1) within each tissue and across tissues.

    Expression is ``log1p(normalize_total(target_sum=1e4))`` of ``X`` over all genes.
    Within: a stratified ``test_size`` split of one tissue's cells. Across: trained on all
    other tissues, tested on the held-out one. Returns ``within_tissue_accuracy`` and
    ``cross_tissue_accuracy`` (dicts keyed by tissue) and their means.
    """
    import warnings

    import scanpy as sc
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    norm = ad.AnnData(X=sp.csr_matrix(adata.X, dtype=np.float32))
    sc.pp.normalize_total(norm, target_sum=1e4)
    sc.pp.log1p(norm)
    X = norm.X
    labels = adata.obs[label_key].astype(str).to_numpy()
    tissue = adata.obs[tissue_key].astype(str).to_numpy()

    def accuracy(train, test) -> float:
        model = LogisticRegression(max_iter=max_iter)
        # A capped lbfgs budget keeps calibration quick on any knobs; the accuracy, not the
        # optimum, is the figure of interest (on the defaults 100 and 1000 iterations agree).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(X[train], labels[train])
        return float((model.predict(X[test]) == labels[test]).mean())

    within, cross = {}, {}
    for name in pd.unique(tissue):
        cells = np.flatnonzero(tissue == name)
        train, test = train_test_split(cells, test_size=test_size, random_state=seed,
                                       stratify=labels[cells])
        within[name] = accuracy(train, test)
        cross[name] = accuracy(np.flatnonzero(tissue != name), cells)
    return {"within_tissue_accuracy": within,
            "within_tissue_mean": float(np.mean(list(within.values()))),
            "cross_tissue_accuracy": cross,
            "cross_tissue_mean": float(np.mean(list(cross.values())))}
