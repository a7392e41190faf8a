"""A seeded synthetic cross-tissue single-cell atlas, so the cross-tissue question is real.

Counts are negative binomial (gamma-Poisson). The mean of gene g in a cell of type k from
tissue t is the cell's library size times a softmax, over a whole transcriptome of
:data:`REFERENCE_GENES` genes, of

    baseline[g] + lineage[k, g] + type[k, g] + tissue[t, g] + interaction[k, t, g] + log capture[t, g]

All effects are natural-log fold changes. Baselines are log-normal, with a share of genes
nearly silent and, where the gene table has them, mitochondrial genes taking a set share of
the UMIs. Cell-type markers and lineage markers (shared by sibling types such as T and NK
cells) are genes of low abundance switched on in their type, so they are detected mostly
there; they are the same in every tissue, except that type x tissue interactions silence
some markers of a type in each tissue (never in the marker's home tissue) and move other
genes, so a classifier trained on some tissues transfers imperfectly. Tissue programs shift
every type of a tissue. The defaults are calibrated against real droplet data (10x Chromium
PBMC figures and scanpy's ``pbmc68k_reduced``; see :data:`CALIBRATION_TARGETS` and
``bench/calibrate_atlas.py``). Genes are real GRCh38 symbols from
:func:`tokbench.data.genes.gene_table`.
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
# Genes of the whole transcriptome the abundance distribution describes (a 10x GRCh38
# reference has about 36,000 features, of which about 20,000 protein-coding genes).
REFERENCE_GENES = 20_000
# Dense entries (cells x genes) sampled at once: about 64 MiB per float32 temporary.
CHUNK_ENTRIES = 2**24
# Non-coding RNA families and numbered pseudogenes (RPL21P106): rarely the genes a
# tokenizer is judged on, so they are used only when clean coding-like symbols run out.
_NONCODING = re.compile(r"^(?:MIR|LINC|SNOR|SCAR|RNA5|RN7S|RNU|RNY|VTRNA|LOC)|\dP\d+$")


@dataclass(frozen=True)
class AtlasKnobs:
    """Generator settings; effects are natural-log fold changes, library sizes in UMIs.

    Gene abundances describe a whole transcriptome of ``REFERENCE_GENES`` genes; a smaller
    ``n_genes`` keeps a panel of it (see :func:`_draw_programs`). The defaults are calibrated
    against real droplet data (``bench/calibrate_atlas.py``, ``docs/benchmarks.md``) and
    keep the cross-tissue question hard (see :func:`calibrate`): within a tissue a logistic
    regression separates the types (accuracy >= 0.95); trained on three tissues and tested
    on the fourth it reaches clearly less.
    """

    baseline_log_sd: float = 1.9  # spread of expressed genes' log-abundance
    active_fraction: float = 0.55  # genes at baseline level; the rest are nearly silent
    inactive_log_shift: float = -4.0  # log-abundance offset of the silent genes
    dispersion_median: float = 4.0  # NB size (theta); smaller is noisier
    dispersion_log_sd: float = 0.5
    library_size_median: float = 5500.0  # UMIs per cell over the whole transcriptome
    library_size_log_sd: float = 0.3  # within a tissue
    tissue_library_log_sd: float = 0.2  # between tissue medians
    capture_log_sd: float = 0.3  # gene-specific detection, per tissue
    # Markers are genes of low abundance elsewhere (between these quantiles of the active
    # genes' baseline), switched on in their lineage or type: detected mostly there.
    marker_baseline_quantiles: tuple[float, float] = (0.3, 0.6)
    n_lineage_markers: int = 15  # per sibling pair
    lineage_lfc: float = 3.0
    n_markers: int = 25  # per cell type
    marker_lfc: float = 4.5
    n_tissue_genes: int = 60  # per tissue program
    tissue_lfc: float = 1.5
    marker_loss: float = 0.68  # fraction of a type's markers silenced in each tissue
    n_interaction_genes: int = 50  # per (type, tissue), up or down
    interaction_lfc: float = 2.5  # sd of those log fold changes
    mito_fraction: float = 0.02  # share of UMIs on mitochondrial genes, when the table has them
    dirichlet_alpha: float = 3.0  # concentration of per-tissue type proportions
    min_cells_per_type: int = 10  # per tissue


@dataclass
class _Programs:
    """Everything drawn before cells are sampled, restricted to the atlas's genes."""

    genes: pd.DataFrame
    cell_types: list[str]
    tissues: list[str]
    baseline: np.ndarray  # (genes,) log-abundance
    theta: np.ndarray  # (genes,) NB size
    lineage_lfc: np.ndarray  # (sibling pairs, genes); type k is in pair k // 2
    type_lfc: np.ndarray  # (types, genes)
    tissue_lfc: np.ndarray  # (tissues, genes)
    library_log_median: np.ndarray  # (tissues,)
    proportions: np.ndarray  # (tissues, types)
    # Expected fraction of a cell's transcriptome UMIs per atlas gene, (types * tissues,
    # genes); rows sum to the share of the transcriptome the genes carry (1 at full size).
    profiles: np.ndarray


def _names(base: tuple[str, ...], n: int, generic: str) -> list[str]:
    return [base[i] if i < len(base) else f"{generic}_{i + 1}" for i in range(n)]


def _mito_rows(table: pd.DataFrame) -> np.ndarray:
    """Rows of the table's mitochondrial protein-coding genes (MT-ND1, MT-CO1, ...), if any."""
    symbol = table["symbol"].astype(str)
    return np.flatnonzero((table["chromosome"].astype(str).isin(["MT", "M"])
                           & symbol.str.fullmatch(r"MT-(?:ND|CO|ATP|CYB)[0-9L]*")).to_numpy())


def _choose_genes(n_genes: int, n_mito: int, rng: np.random.Generator) -> pd.DataFrame:
    """``n_genes`` rows of the gene table, in genomic order: the first ``n_mito`` of the
    mitochondrial genes, then clean symbols (coding-like first)."""
    table = gene_table()
    if n_genes > len(table):
        raise TokbenchError(f"synthetic atlas: n_genes={n_genes} exceeds the {len(table)} "
                            "genes of the GRCh38 table; ask for fewer genes.")
    symbol = table["symbol"].astype(str)
    clean = symbol.str.fullmatch(r"[A-Z][A-Z0-9]*").to_numpy()
    coding_like = clean & ~symbol.str.contains(_NONCODING).to_numpy()
    # Rank: MT, then coding-like, then other clean symbols, then the rest; random within a tier.
    tier = np.where(coding_like, 1, np.where(clean, 2, 3))
    tier[_mito_rows(table)[:n_mito]] = 0
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
    """Effects over a whole transcriptome, then the ``n_genes`` genes the atlas keeps.

    The transcriptome has ``max(n_genes, REFERENCE_GENES)`` genes. A smaller atlas is a
    panel of it, as an HVG selection is: the mitochondrial genes, lineage, type and tissue
    program genes (up to half the panel), then the most abundant other genes; its cells
    keep the UMIs that fall on the panel. A 300-gene atlas is therefore dense, as a 300-gene panel of real cells is,
    and the default 20,000-gene atlas as sparse as whole-transcriptome droplet data.
    """
    n_mito = len(_mito_rows(gene_table()))
    n_ref = max(n_genes, REFERENCE_GENES)
    n_active = max(1, round(k.active_fraction * n_ref))
    active = np.sort(rng.choice(n_ref, size=n_active, replace=False))
    baseline = rng.normal(0.0, k.baseline_log_sd, n_ref).astype(np.float32)
    baseline[np.setdiff1d(np.arange(n_ref), active)] += k.inactive_log_shift
    mito = np.empty(0, dtype=np.int64)
    if n_mito and k.mito_fraction > 0:
        # The most abundant active genes stand for the mitochondrial ones, scaled so that
        # together they take ``mito_fraction`` of an average cell's UMIs.
        mito = active[np.argsort(-baseline[active])[:n_mito]]
        others = np.setdiff1d(np.arange(n_ref), mito)
        rest = float(np.exp(baseline[others].astype(np.float64)).sum())
        weights = np.exp(baseline[mito].astype(np.float64))
        baseline[mito] = np.log(k.mito_fraction / (1 - k.mito_fraction) * rest
                                * weights / weights.sum())
        active = np.setdiff1d(active, mito)  # no program moves a mitochondrial gene
    lo, hi = np.quantile(baseline[active], k.marker_baseline_quantiles)
    marker_pool = active[(baseline[active] >= lo) & (baseline[active] <= hi)]
    theta = k.dispersion_median * np.exp(rng.normal(0, k.dispersion_log_sd, n_ref))
    n_pairs = (n_cell_types + 1) // 2
    lineage = np.stack([_sparse_effect(rng, n_ref, marker_pool, k.n_lineage_markers, k.lineage_lfc)
                        for _ in range(n_pairs)])
    type_lfc = np.stack([_sparse_effect(rng, n_ref, marker_pool, k.n_markers, k.marker_lfc)
                         for _ in range(n_cell_types)])
    tissue = np.stack([_sparse_effect(rng, n_ref, active, k.n_tissue_genes, k.tissue_lfc)
                       for _ in range(n_tissues)])
    interaction = np.zeros((n_cell_types, n_tissues, n_ref), dtype=np.float32)
    for c in range(n_cell_types):
        markers = np.flatnonzero(type_lfc[c])
        # Every marker has a home tissue where it stays on, so each is a marker somewhere;
        # elsewhere a fixed count per (type, tissue) is silenced rather than a coin per
        # marker: transfer then varies less between seeds and held-out tissues.
        home = rng.permutation(np.arange(len(markers)) % n_tissues)
        for t in range(n_tissues):
            away = markers[home != t]
            lost = rng.choice(away, size=min(len(away), round(k.marker_loss * len(markers))),
                              replace=False)
            interaction[c, t, lost] = -type_lfc[c, lost]
            interaction[c, t] += _sparse_effect(rng, n_ref, active, k.n_interaction_genes,
                                                k.interaction_lfc, sign=True)
    log_capture = rng.normal(0, k.capture_log_sd, (n_tissues, n_ref)).astype(np.float32)
    library = np.log(k.library_size_median) + rng.normal(0, k.tissue_library_log_sd, n_tissues)
    proportions = rng.dirichlet(np.full(n_cell_types, k.dirichlet_alpha), size=n_tissues)

    # The panel: mitochondrial genes, program genes (markers first) up to half the panel,
    # then the most abundant genes; real panels carry abundant genes too, which keeps a
    # small atlas's cells from detecting only a few marker genes each.
    priority = np.full(n_ref, 4.0)
    priority[(tissue > 0).any(axis=0)] = 3
    priority[(lineage > 0).any(axis=0)] = 2
    priority[(type_lfc > 0).any(axis=0)] = 1
    priority[mito] = 0
    ranked = np.lexsort((-baseline, rng.random(n_ref), priority))
    programs = ranked[(priority[ranked] > 0) & (priority[ranked] < 4)][: n_genes // 2]
    chosen = np.concatenate([mito, programs])
    rest = np.setdiff1d(np.arange(n_ref), chosen)
    rest = rest[np.argsort(-baseline[rest], kind="stable")][: max(0, n_genes - len(chosen))]
    kept = np.sort(np.concatenate([chosen, rest])[:n_genes])
    n_mito_kept = int(np.isin(mito, kept).sum())
    genes = _choose_genes(n_genes, n_mito_kept, rng)
    # Atlas genes are in genomic order; which transcriptome gene lands where is random,
    # except that the mitochondrial genes land on the table's MT rows.
    is_mito_row = np.isin(np.arange(n_genes), np.flatnonzero(
        genes["chromosome"].astype(str).isin(["MT", "M"]).to_numpy()
        & genes["symbol"].astype(str).str.fullmatch(r"MT-(?:ND|CO|ATP|CYB)[0-9L]*").to_numpy()))
    slot = np.empty(n_genes, dtype=np.int64)
    kept_mito = np.isin(kept, mito)
    slot[is_mito_row] = kept[kept_mito]
    slot[~is_mito_row] = rng.permutation(kept[~kept_mito])

    pair = np.arange(n_cell_types) // 2
    profiles = np.empty((n_cell_types * n_tissues, n_genes), dtype=np.float32)
    for c in range(n_cell_types):
        logits = (baseline + lineage[pair[c]] + type_lfc[c] + tissue + interaction[c]
                  + log_capture).astype(np.float64)  # (tissues, n_ref)
        logits -= logits.max(axis=1, keepdims=True)
        rates = np.exp(logits)
        rates /= rates.sum(axis=1, keepdims=True)
        profiles[c * n_tissues:(c + 1) * n_tissues] = rates[:, slot]
    return _Programs(genes, _names(CELL_TYPE_NAMES, n_cell_types, "type"),
                     _names(TISSUE_NAMES, n_tissues, "tissue"), baseline[slot],
                     theta[slot].astype(np.float32), lineage[:, slot], type_lfc[:, slot],
                     tissue[:, slot], library, proportions, profiles)


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
    combo = type_code * n_tissues + tissue_code
    # Dense only per chunk, so memory stays bounded by CHUNK_ENTRIES whatever the size.
    chunk_cells = max(1, CHUNK_ENTRIES // n_genes)
    starts = range(0, n_cells, chunk_cells)
    chunks = []
    for start, chunk_seq in zip(starts, chunk_seed.spawn(len(starts))):
        rows = slice(start, start + chunk_cells)
        mean = library[rows, None] * p.profiles[combo[rows]]  # expected UMIs, cells x genes
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
              "n_cell_types": int(n_cell_types), "seed": int(seed),
              # h5ad stores lists, not tuples
              **{name: list(v) if isinstance(v, tuple) else v
                 for name, v in dataclasses.asdict(k).items()}}
    symbols = var.index.to_numpy()
    params["marker_genes"] = {name: [str(g) for g in symbols[p.type_lfc[i] > 0]]
                              for i, name in enumerate(p.cell_types)}
    params["tissue_program_genes"] = {name: [str(g) for g in symbols[p.tissue_lfc[i] > 0]]
                                      for i, name in enumerate(p.tissues)}
    return ad.AnnData(X=X, obs=obs, var=var, uns={"synth": params}), p


def generate_atlas(n_cells: int = 6000, n_genes: int = 20_000, n_tissues: int = 4,
                   n_cell_types: int = 8, seed: int = 0, **knobs) -> ad.AnnData:
    """Generate the synthetic atlas: ``n_cells`` cells x ``n_genes`` genes of raw UMI counts.

    ``X`` is a float32 CSR matrix of integer counts; ``obs`` has ``cell_type``, ``tissue``
    (categoricals) and ``n_counts`` (UMIs per cell); ``var_names`` are GRCh38 gene symbols
    with ``var`` columns ``ensembl_id``, ``chromosome``, ``start`` (bp). ``uns["synth"]``
    holds the parameters and each type's marker and each tissue's program genes. ``knobs``
    override fields of :class:`AtlasKnobs`. The same arguments give the same atlas.

    At the default 20,000 genes the cells look like whole-transcriptome droplet data
    (about 1,800 genes and 4,900 UMIs per cell); fewer genes give a panel of that
    transcriptome (program genes and the most abundant ones), denser per gene. Memory
    stays bounded (:data:`CHUNK_ENTRIES` dense entries at a time, then the CSR matrix).
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


def write_atlas(out, n_cells: int = 6000, n_genes: int = 20_000, n_tissues: int = 4,
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


# Mean-count bins (UMIs per cell) in which the per-gene fraction of zeros is compared.
ZERO_FRACTION_BINS = ((0.05, 0.2), (0.2, 0.5), (0.5, 1.0), (1.0, 3.0))


def count_statistics(adata: ad.AnnData, label_key: str | None = "cell_type",
                     n_markers: int = 10) -> dict[str, float]:
    """Per-cell, per-gene and marker statistics of a raw UMI count matrix, for calibration.

    ``X`` holds integer counts (cells x genes); ``obs["n_counts"]`` and ``obs["n_genes"]``,
    where present, are taken as the cells' whole-transcriptome totals (scanpy's
    ``pbmc68k_reduced`` keeps them from before its genes were subset), otherwise they are
    computed from ``X``. Returns, with NaN where a statistic does not apply:

    - ``genes_per_cell_median``, ``genes_per_cell_q25``, ``genes_per_cell_q75``: genes with a
      nonzero count per cell; ``detected_fraction_median``: the median over ``n_vars``.
    - ``umis_per_cell_median`` (UMIs); ``umis_per_detected_gene_median``: the median of each
      cell's UMIs / detected genes; ``library_iqr_over_median``: spread of UMIs per cell.
    - ``mito_fraction_median``: share of a cell's UMIs on genes named ``MT-*``.
    - ``mean_variance_slope``: least-squares slope of log10 variance on log10 mean over genes
      with a mean of 0.05-10 UMIs per cell (1 is Poisson; overdispersion makes it larger);
      ``overdispersion_median``: median of (variance - mean) / mean^2 over genes with a mean
      of 0.1-10 (the negative-binomial 1/theta).
    - ``zero_fraction[lo,hi)``: median fraction of cells with a zero, over genes whose mean
      lies in each bin of :data:`ZERO_FRACTION_BINS`.
    - ``marker_detection_own`` / ``marker_detection_other``: for each ``label_key`` group's
      top ``n_markers`` genes (scanpy ``rank_genes_groups``, t-test on log1p of counts per
      10,000), the fraction of the group's cells (resp. other cells) that detect them.
    """
    import scanpy as sc
    from scipy import stats

    X = sp.csr_matrix(adata.X, dtype=np.float32)
    detected = np.diff(X.indptr)
    umis = np.asarray(X.sum(axis=1)).ravel()
    obs_genes = adata.obs["n_genes"].to_numpy(float) if "n_genes" in adata.obs else detected
    obs_umis = adata.obs["n_counts"].to_numpy(float) if "n_counts" in adata.obs else umis
    q25, q50, q75 = np.percentile(obs_genes, [25, 50, 75])
    out = {"genes_per_cell_median": float(q50), "genes_per_cell_q25": float(q25),
           "genes_per_cell_q75": float(q75),
           "detected_fraction_median": float(np.median(detected) / adata.n_vars),
           "umis_per_cell_median": float(np.median(obs_umis)),
           "umis_per_detected_gene_median": float(np.median(obs_umis / np.maximum(obs_genes, 1))),
           "library_iqr_over_median": float(np.subtract(*np.percentile(obs_umis, [75, 25]))
                                            / np.median(obs_umis))}
    if "percent_mito" in adata.obs:
        out["mito_fraction_median"] = float(adata.obs["percent_mito"].median())
    else:
        mito = adata.var_names.str.upper().str.startswith("MT-")
        out["mito_fraction_median"] = (float(np.median(np.asarray(X[:, mito].sum(axis=1)).ravel()
                                                       / np.maximum(umis, 1)))
                                       if mito.any() else float("nan"))

    mean = np.asarray(X.mean(axis=0)).ravel().astype(np.float64)
    square = np.asarray(X.multiply(X).mean(axis=0)).ravel().astype(np.float64)
    var = (square - mean**2) * X.shape[0] / (X.shape[0] - 1)
    zero = 1.0 - np.bincount(X.indices, minlength=X.shape[1]) / X.shape[0]
    fit = (mean >= 0.05) & (mean <= 10) & (var > 0)
    out["mean_variance_slope"] = (float(stats.linregress(np.log10(mean[fit]), np.log10(var[fit])).slope)
                                  if fit.sum() > 2 else float("nan"))
    disp = (mean >= 0.1) & (mean <= 10)
    out["overdispersion_median"] = (float(np.median((var[disp] - mean[disp]) / mean[disp] ** 2))
                                    if disp.any() else float("nan"))
    for lo, hi in ZERO_FRACTION_BINS:
        in_bin = (mean >= lo) & (mean < hi)
        out[f"zero_fraction[{lo:g},{hi:g})"] = (float(np.median(zero[in_bin])) if in_bin.any()
                                                else float("nan"))

    out["marker_detection_own"] = out["marker_detection_other"] = float("nan")
    if label_key is not None and label_key in adata.obs:
        labels = adata.obs[label_key].astype(str).to_numpy()
        norm = ad.AnnData(X=X.copy(), obs=pd.DataFrame({"group": pd.Categorical(labels)},
                                                       index=adata.obs_names))
        norm.var_names = adata.var_names
        sc.pp.normalize_total(norm, target_sum=1e4)
        sc.pp.log1p(norm)
        sc.tl.rank_genes_groups(norm, "group", method="t-test", n_genes=n_markers)
        names = norm.uns["rank_genes_groups"]["names"]
        position = {g: i for i, g in enumerate(adata.var_names)}
        own, other = [], []
        for group in names.dtype.names:
            columns = [position[g] for g in names[group]]
            hit = (X[:, columns] > 0).toarray()
            in_group = labels == group
            own.append(hit[in_group].mean())
            other.append(hit[~in_group].mean())
        out["marker_detection_own"] = float(np.mean(own))
        out["marker_detection_other"] = float(np.mean(other))
    return out


@dataclass(frozen=True)
class CalibrationTarget:
    """A :func:`count_statistics` key, the real data's value and the band the atlas must hit."""

    statistic: str
    real: float
    low: float
    high: float
    source: str


_TENX_V3 = ("10x Genomics '5k PBMCs from a healthy donor (v3 chemistry)' (5k_pbmc_protein_v3, "
            "Cell Ranger 3.0 web summary: 5,247 cells, 28,918 mean reads per cell)")
_PBMC68K_OBS = ("scanpy pbmc68k_reduced obs (700 cells of Zheng et al. 2017, Nat Commun 8:14049; "
                "whole-transcriptome totals kept from before its genes were subset)")
_PBMC68K_X = "scanpy pbmc68k_reduced counts (700 cells x 765 genes, integer counts recovered)"

# Real figures with the band each atlas statistic must fall in. pbmc68k_reduced's cells all
# detect over 1,000 genes (a filter), which narrows its library-size spread; its 765 genes
# are variable ones, so per-gene figures compare genes of equal mean, never per-cell ones.
# Its top genes per label are shared by sibling T-cell labels, so the marker bands follow
# the definition of a marker (mostly in its type, rarely elsewhere), its figure is context.
CALIBRATION_TARGETS = (
    CalibrationTarget("genes_per_cell_median", 1644, 1100, 2500, _TENX_V3),
    CalibrationTarget("detected_fraction_median", 1644 / 33538, 0.03, 0.10,
                      _TENX_V3 + " over the 33,538 features of its GRCh38 reference"),
    CalibrationTarget("umis_per_detected_gene_median", 2.947, 2.2, 3.7, _PBMC68K_OBS),
    CalibrationTarget("library_iqr_over_median", 0.266, 0.2, 0.7, _PBMC68K_OBS),
    CalibrationTarget("mito_fraction_median", 0.0167, 0.005, 0.05, _PBMC68K_OBS),
    CalibrationTarget("mean_variance_slope", 1.227, 1.08, 1.38, _PBMC68K_X),
    CalibrationTarget("overdispersion_median", 0.805, 0.54, 1.21, _PBMC68K_X),
    CalibrationTarget("zero_fraction[0.05,0.2)", 0.901, 0.85, 0.95, _PBMC68K_X),
    CalibrationTarget("zero_fraction[0.2,0.5)", 0.759, 0.71, 0.81, _PBMC68K_X),
    CalibrationTarget("zero_fraction[0.5,1)", 0.576, 0.53, 0.63, _PBMC68K_X),
    CalibrationTarget("zero_fraction[1,3)", 0.360, 0.31, 0.41, _PBMC68K_X),
    CalibrationTarget("marker_detection_own", 0.950, 0.6, 1.0, _PBMC68K_X + ", by bulk_labels"),
    CalibrationTarget("marker_detection_other", 0.487, 0.0, 0.25, _PBMC68K_X + ", by bulk_labels"),
)
