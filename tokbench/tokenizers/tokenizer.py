"""Assemble a tokenizer from its Fg, Fe and Fc configs, and print the component catalogue."""

from __future__ import annotations

import functools
import logging
import textwrap
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from tokbench.data.prepared import PreparedData
from tokbench.errors import TokbenchError
from tokbench.tokenizers import encoders
from tokbench.tokenizers.base import N_SPECIAL, CellSentences
from tokbench.tokenizers.config import (
    COMPONENTS,
    REQUIRED,
    load_component,
    preset_description,
    preset_names,
    resolve_params,
    to_config,
)
from tokbench.tokenizers.constructor import SentenceBuilder, chromosome_layout
from tokbench.tokenizers.gene_vectors import match_genes, pca, read_gene_vectors

log = logging.getLogger(__name__)


class CellTokenizer:
    """A built tokenizer: :meth:`sentences` (data side) plus :attr:`embedder` (model side).

    Attributes: ``vocab_size`` (gene-token ids, specials and chromosome tokens included),
    ``max_length`` (longest possible sentence, CLS and chromosome tokens included),
    ``n_expression_bins`` (rows of the Fe bin embedding, or None), ``genes_mapped`` /
    ``genes_total`` (pretrained Fg; both ``n_genes`` otherwise).
    """

    def __init__(
        self,
        *,
        data: PreparedData,
        builder: SentenceBuilder,
        embedder: encoders.CellEmbedder,
        vocab_size: int,
        n_expression_bins: int | None,
        tags: dict[str, str],
        params: dict[str, Any],
        gene_keep: np.ndarray | None,
        genes_mapped: int,
    ):
        self.data, self.builder, self.embedder = data, builder, embedder
        self.vocab_size, self.n_expression_bins = vocab_size, n_expression_bins
        self.max_length = builder.max_length
        self.genes_mapped, self.genes_total = genes_mapped, data.n_genes
        self._tags, self._params, self._gene_keep = tags, params, gene_keep

    def sentences(self, cells: np.ndarray, epoch: int, device: torch.device | str = "cpu") -> CellSentences:
        """Tokenise the cells with these row indices; random choices depend only on (seed, epoch, cell)."""
        cells = np.asarray(cells, dtype=np.int64)
        indptr, indices, values = self.data.rows(cells)
        return self.builder.build(indptr, indices, values, cells, epoch, device)

    def sentences_from_csr(self, indptr, indices, values, cells, epoch: int, device="cpu") -> CellSentences:
        """Tokenise CSR rows already in memory (``cells`` still name the rows, for the random draws)."""
        return self.builder.build(indptr, indices, values, cells, epoch, device)

    def describe(self) -> dict[str, str]:
        """Tags: ``fg``, ``fe``, ``fc``, ``order``, ``select``, ``combine``, ``preset``."""
        return dict(self._tags)

    def params(self) -> dict[str, Any]:
        """Every resolved parameter, flat (``fc.select.size``, ``fe.n_bins``, ...)."""
        return dict(self._params)

    @functools.cached_property
    def n_empty_cells(self) -> int:
        """Cells of the dataset with no expressed gene (their sentence is CLS alone)."""
        return int(self.empty_cells().sum())

    def empty_cells(self, chunk: int = 1 << 22) -> np.ndarray:
        """Boolean mask over all cells: no value > 0 among the genes a sentence may use."""
        indptr = np.asarray(self.data.indptr, dtype=np.int64)
        # prefix[i] counts the expressed values before row i; the stored values are walked
        # in chunks because the cache may be far larger than memory.
        prefix, carry = np.zeros(len(indptr), dtype=np.int64), 0
        for lo in range(int(indptr[0]), int(indptr[-1]), chunk):
            hi = min(lo + chunk, int(indptr[-1]))
            expressed = np.asarray(self.data.data[lo:hi]) > 0
            if self._gene_keep is not None:
                expressed &= self._gene_keep[np.asarray(self.data.indices[lo:hi])]
            running = np.cumsum(expressed) + carry
            a, b = np.searchsorted(indptr, [lo, hi], side="right")
            prefix[a:b] = running[indptr[a:b] - lo - 1]
            carry = int(running[-1])
        return np.diff(prefix) == 0


def build_tokenizer(fg, fe, fc, data: PreparedData, d_model: int, seed: int) -> CellTokenizer:
    """Build the tokenizer of ``fg``/``fe``/``fc`` for ``data`` (see :func:`_build_tokenizer`).

    The embedder's initial weights are a function of ``seed`` alone (not of whatever used
    the global torch RNG before), and the global RNG is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build_tokenizer(fg, fe, fc, data, d_model, seed)


def _build_tokenizer(fg, fe, fc, data: PreparedData, d_model: int, seed: int) -> CellTokenizer:
    """Build the tokenizer named by three configs (``FgConfig``/``FeConfig``/``FcConfig``,
    ``DictConfig`` or dict) for ``data``, with token vectors of size ``d_model``.

    Every problem with the configs or a pretrained file raises :class:`TokbenchError` here,
    before any training starts.
    """
    if d_model < 1:
        raise TokbenchError(f"d_model must be >= 1 (got {d_model})")
    fg_cfg, fe_cfg, fc_cfg = to_config("fg", fg), to_config("fe", fe), to_config("fc", fc)
    fg_name, fg_params = resolve_params("fg", fg_cfg, "fg")
    fe_name, fe_params = resolve_params("fe", fe_cfg, "fe")
    order, order_params = resolve_params("order", fc_cfg.order, "fc.order")
    select, select_params = resolve_params("select", fc_cfg.select, "fc.select")
    combine, _ = resolve_params("combine", fc_cfg.combine, "fc.combine")
    if combine == "gene_only" and fe_name != "zero":
        raise TokbenchError(f"fc.combine=gene_only ignores the expression encoder, but fe={fe_name}; use fe=zero "
                            "or a combine that uses it (sum, concat)")
    size = select_params["size"]
    if size < 1:
        raise TokbenchError(f"fc.select.size must be >= 1 (got {size})")

    n_genes = data.n_genes
    layout = None
    if order == "chromosome":
        layout = chromosome_layout(data.gene_chromosome, data.gene_start, data.gene_ids)
    vocab_size = N_SPECIAL + n_genes + (layout.n_groups if layout else 0)

    gene_keep, genes_mapped = None, n_genes
    if fg_name == "learned":
        genes = encoders.LearnedGenes(vocab_size, d_model)
    else:
        genes, gene_keep, genes_mapped = _pretrained_genes(fg_params, data, vocab_size, d_model, seed)
    unplaced = 0
    if layout is not None and layout.n_unplaced:
        # UCE drops genes missing from its chromosome file before sampling; so does tokbench.
        unplaced = layout.n_unplaced
        gene_keep = layout.placed if gene_keep is None else gene_keep & layout.placed
        examples = ", ".join(map(str, np.asarray(data.gene_ids)[~layout.placed][:5]))
        log.info("fc.order=chromosome: %d of %d genes have no chromosome and are left out of every sentence "
                 "(e.g. %s)", unplaced, n_genes, examples)

    expression, bins, n_expression_bins = _expression_encoder(fe_name, fe_params, d_model)
    if select == "panel":
        _check_panel(order, size, n_genes if gene_keep is None else int(np.sum(gene_keep)))
    gene_median = _gene_median(data) if order == "expression" and order_params.get("normalize_by_median") else None
    count_scale = total_scale = None
    needs_counts = gene_median is not None or select == "weighted_sample"
    # The builder recovers counts as expm1(x) * library_size / target_sum: log1p values only.
    if needs_counts and data.library_size is not None and data.total_counts is not None and data.log1p:
        count_scale = np.asarray(data.library_size, dtype=np.float64) / data.target_sum
        total_scale = data.target_sum / np.maximum(np.asarray(data.total_counts, dtype=np.float64), 1.0)
    elif needs_counts:
        log.warning("the data has no per-cell counts (library_size, total_counts) or is not log1p-transformed: "
                    "%s uses the stored values instead of raw counts", order if gene_median is not None else select)
    builder = SentenceBuilder(
        order=order, select=select, size=size, n_genes=n_genes, seed=seed,
        resample=select_params.get("resample", True), gene_median=gene_median, count_scale=count_scale,
        total_scale=total_scale, layout=layout, gene_keep=gene_keep, bins=bins,
    )
    embedder = encoders.CellEmbedder(genes, expression, combine, d_model)

    fc_label = fc_cfg.name or "custom"
    unchanged = fc_label in preset_names("fc") and (
        OmegaConf.to_container(load_component("fc", fc_label)) == OmegaConf.to_container(fc_cfg)
    )
    preset = fc_label if unchanged else "custom"
    tags = {"fg": fg_name, "fe": fe_name, "fc": fc_label, "order": order, "select": select,
            "combine": combine, "preset": preset}
    params = {"fg.name": fg_name, "fe.name": fe_name, "fc.name": fc_label, "fc.order.name": order,
              "fc.select.name": select, "fc.combine.name": combine}
    params.update({f"fg.{k}": v for k, v in fg_params.items()})
    params.update({f"fe.{k}": v for k, v in fe_params.items()})
    params.update({f"fc.order.{k}": v for k, v in order_params.items()})
    params.update({f"fc.select.{k}": v for k, v in select_params.items()})
    if layout is not None:
        params["fc.order.genes_without_chromosome"] = unplaced
    log.info("tokenizer %s: vocab %d, max_length %d", tags, vocab_size, builder.max_length)
    return CellTokenizer(data=data, builder=builder, embedder=embedder, vocab_size=vocab_size,
                         n_expression_bins=n_expression_bins, tags=tags, params=params,
                         gene_keep=gene_keep, genes_mapped=genes_mapped)


def _expression_encoder(name: str, params: dict, d_model: int):
    """(module or None, bins spec for the builder, rows of the bin embedding)."""
    n_bins = params.get("n_bins")
    if name == "zero":
        return None, None, None
    if name == "linear":
        return encoders.LinearExpression(d_model), None, None
    if name == "mlp":
        hidden = params["hidden"] or d_model
        if hidden < 1:
            raise TokbenchError(f"fe.hidden must be >= 1 (got {hidden})")
        return encoders.MlpExpression(d_model, hidden), None, None
    if name == "bin_scbert":
        if n_bins < 1:
            raise TokbenchError(f"fe.n_bins must be >= 1 for bin_scbert (got {n_bins})")
        return encoders.BinnedExpression(n_bins + 2, d_model, layer_norm=False), ("scbert", n_bins), n_bins + 2
    if name == "bin_scgpt":
        if n_bins < 3:
            raise TokbenchError(
                f"fe.n_bins must be >= 3 for bin_scgpt (zero bin + at least 2 quantile bins; got {n_bins})"
            )
        return encoders.BinnedExpression(n_bins, d_model, layer_norm=True), ("scgpt", n_bins), n_bins
    if n_bins < 1:
        raise TokbenchError(f"fe.n_bins must be >= 1 for autobin (got {n_bins})")
    return encoders.AutoBinExpression(d_model, n_bins, float(params["alpha"])), None, None


def _gene_median(data: PreparedData) -> np.ndarray:
    """Geneformer's per-gene medians (linear, normalised by each cell's total count, nonzero
    training values); genes never expressed in training use the median over genes (Geneformer
    has no token for them at all; tokbench keeps them rather than drop test-only genes)."""
    median = np.asarray(data.gene_median_normalised(), dtype=np.float64)
    known = np.isfinite(median) & (median > 0)
    if not known.any():
        raise TokbenchError(
            "fc.order.normalize_by_median needs training cells with expressed genes (split 'train' is empty)"
        )
    return np.where(known, median, np.median(median[known]))


def _check_panel(order: str, size: int, n_panel: int) -> None:
    """``select: panel`` needs the gene-index order and a panel of at most L genes."""
    if order != "gene_index":
        raise TokbenchError(f"fc.select.name=panel lists every gene in gene-index order, but fc.order.name={order}; "
                            "set fc.order.name=gene_index")
    if n_panel > size:
        raise TokbenchError(
            f"fc.select.name=panel puts all {n_panel} genes of the panel in every sentence, more than "
            f"fc.select.size={size} (L); choose fewer genes (dataset.n_top_genes={size}) or raise fc.select.size"
        )


def _pretrained_genes(params: dict, data: PreparedData, vocab_size: int, d_model: int, seed: int):
    missing, threshold = params["missing"], float(params["min_fraction_mapped"])
    if missing not in ("drop", "learn"):
        raise TokbenchError(f"fg.missing={missing!r} is not a policy; valid: drop, learn")
    if not 0.0 <= threshold <= 1.0:
        raise TokbenchError(f"fg.min_fraction_mapped must be in [0, 1] (got {threshold})")
    table = read_gene_vectors(params["path"], params["format"], params["gene_column"], params["gene_list"])
    rows = match_genes(data.gene_ids, data.gene_symbols, table.ids)
    mapped = rows >= 0
    n_mapped, fraction = int(mapped.sum()), float(mapped.mean()) if len(rows) else 0.0
    log.info("pretrained gene vectors %s (dim %d): %d of %d dataset genes mapped (%.1f%%); the other %d are %s",
             table.path, table.dim, n_mapped, len(rows), 100 * fraction, len(rows) - n_mapped,
             "dropped" if missing == "drop" else "learned")
    if fraction < threshold or n_mapped == 0:
        examples = ", ".join(map(str, np.asarray(data.gene_ids)[~mapped][:5]))
        raise TokbenchError(
            f"fg.path: only {n_mapped} of {len(rows)} dataset genes ({fraction:.1%}) have a vector in "
            f"{table.path}, below fg.min_fraction_mapped={threshold}; unmatched examples: {examples}. "
            "Check that the file and the dataset use symbols or Ensembl ids of the same species."
        )
    vectors = table.vectors
    if params["pca"]:
        vectors = pca(vectors, min(d_model, *vectors.shape), seed)
    full = torch.zeros(vocab_size, vectors.shape[1], dtype=torch.float32)
    full[N_SPECIAL + np.flatnonzero(mapped)] = torch.from_numpy(vectors[rows[mapped]])
    has_vector = torch.zeros(vocab_size, dtype=torch.bool)
    has_vector[N_SPECIAL + np.flatnonzero(mapped)] = True
    genes = encoders.PretrainedGenes(full, has_vector, d_model, frozen=bool(params["frozen"]))
    return genes, (mapped if missing == "drop" else None), n_mapped


def catalogue() -> str:
    """Every Fg, Fe and Fc part and every preset, one line each with its parameters."""

    def shown(default) -> str:
        return "<required>" if default is REQUIRED else "-" if default is None else str(default).lower()

    lines = ["Tokenizer = Fg (gene identity) + Fe (expression) + Fc (select -> order -> combine)."]
    titles = {"fg": "Fg fg.name", "fe": "Fe fe.name", "select": "Fc fc.select.name",
              "order": "   fc.order.name", "combine": "   fc.combine.name"}
    for kind in ("fg", "fe", "select", "order", "combine"):
        lines.append(titles[kind])
        for name, part in COMPONENTS[kind].items():
            params = ", ".join(f"{k}={shown(d)}" for k, (d, _) in part.params.items())
            line = f"    {name:<16}{part.description}"
            if params and len(line) + len(params) + 4 > 100:
                lines.append(line)
                lines += textwrap.wrap(f"[{params}]", 100, initial_indent=" " * 20, subsequent_indent=" " * 21)
            else:
                lines.append(f"{line}  [{params}]" if params else line)
    lines.append("Presets fc=NAME, then fe=NAME fg=NAME; override e.g. fc.select.size=512")
    for name in preset_names("fc"):
        cfg = load_component("fc", name)
        recipe = f"{cfg.select.name}:{cfg.select.size} > {cfg.order.name} > {cfg.combine.name}"
        lines.append(f"    {name:<18}{recipe:<44} {preset_description('fc', name)}")
    lines.append(f"    fe=NAME: {', '.join(preset_names('fe'))};  fg=NAME: {', '.join(preset_names('fg'))}")
    lines.append("Token ids: PAD=0 CLS=1 MASK=2 CHROM_END=3, gene j = 4+j, chromosome group g = 4+n_genes+g.")
    return "\n".join(lines)
