"""Assemble a tokenizer from its Fg, Fe and Fc configs, and print the component catalogue."""

from __future__ import annotations

import dataclasses
import functools
import logging
import textwrap
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from tokbench.data.prepared import PreparedData
from tokbench.errors import TokbenchError
from tokbench.tokenizers import encoders, registry
from tokbench.tokenizers.base import N_SPECIAL, CellSentences
from tokbench.tokenizers.config import load_component, parts, preset_description, preset_names, to_config
from tokbench.tokenizers.constructor import SentenceBuilder, chromosome_layout
from tokbench.tokenizers.parts import (
    BuildContext,
    BuiltinOrder,
    ExpressionOrder,
    Panel,
    Sample,
    Truncate,
    WeightedSample,
)

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
    """Build the tokenizer named by three part configs (mappings or ``DictConfig``) for
    ``data``, with token vectors of size ``d_model``.

    Every problem with the configs or a pretrained file raises :class:`TokbenchError` here,
    before any training starts.
    """
    if d_model < 1:
        raise TokbenchError(f"d_model must be >= 1 (got {d_model})")
    fc_cfg = to_config("fc", fc)
    built = parts(fg, fe, fc_cfg)
    gene_part, fe_part = built["fg"], built["fe"]
    order, select, combine = built["order"], built["select"], built["combine"]

    n_genes = data.n_genes
    layout = chromosome_layout(data.gene_chromosome, data.gene_start, data.gene_ids) if order.needs_layout else None
    vocab_size = N_SPECIAL + n_genes + (layout.n_groups if layout else 0)
    ctx = BuildContext(data=data, d_model=d_model, vocab_size=vocab_size, seed=seed)

    genes, gene_keep, genes_mapped = gene_part.build(ctx)
    unplaced = 0
    if layout is not None and layout.n_unplaced:
        # UCE drops genes missing from its chromosome file before sampling; so does tokbench.
        unplaced = layout.n_unplaced
        gene_keep = layout.placed if gene_keep is None else gene_keep & layout.placed
        examples = ", ".join(map(str, np.asarray(data.gene_ids)[~layout.placed][:5]))
        log.info("fc.order=chromosome: %d of %d genes have no chromosome and are left out of every sentence "
                 "(e.g. %s)", unplaced, n_genes, examples)

    expression = fe_part.build(ctx)
    order.setup(ctx)
    select.setup(ctx)
    size = select.size
    if isinstance(select, Panel):
        _check_panel(size, n_genes if gene_keep is None else int(np.sum(gene_keep)))
    normalize = isinstance(order, ExpressionOrder) and order.params.normalize_by_median
    gene_median = _gene_median(data) if normalize else None
    count_scale = total_scale = None
    # Raw counts: Geneformer's key, UCE's weights, and whatever a user's part asks for.
    needs_counts = gene_median is not None or isinstance(select, WeightedSample) or not (
        isinstance(order, BuiltinOrder) and isinstance(select, (Truncate, Sample, WeightedSample, Panel)))
    # The builder recovers counts as expm1(x) * library_size / target_sum: log1p values only.
    if needs_counts and data.library_size is not None and data.total_counts is not None and data.log1p:
        count_scale = np.asarray(data.library_size, dtype=np.float64) / data.target_sum
        total_scale = data.target_sum / np.maximum(np.asarray(data.total_counts, dtype=np.float64), 1.0)
    elif gene_median is not None or isinstance(select, WeightedSample):
        log.warning("the data has no per-cell counts (library_size, total_counts) or is not log1p-transformed: "
                    "%s uses the stored values instead of raw counts",
                    order.label() if gene_median is not None else select.label())
    builder = SentenceBuilder(
        order=order, select=select, n_genes=n_genes, seed=seed, gene_median=gene_median, count_scale=count_scale,
        total_scale=total_scale, layout=layout, gene_keep=gene_keep, bins=fe_part.sentence_bins(),
    )
    embedder = encoders.CellEmbedder(genes, expression, combine.build(ctx), combine.uses_expression)

    tags = tokenizer_tags(fg, fe, fc_cfg)
    params = {"fg.name": gene_part.label(), "fe.name": fe_part.label(), "fc.name": fc_cfg.name or "custom",
              "fc.order.name": order.label(), "fc.select.name": select.label(), "fc.combine.name": combine.label()}
    for key, part in (("fg", gene_part), ("fe", fe_part), ("fc.order", order), ("fc.select", select),
                      ("fc.combine", combine)):
        params.update({f"{key}.{k}": v for k, v in registry.params_dict(part.params).items()})
    if layout is not None:
        params["fc.order.genes_without_chromosome"] = unplaced
    log.info("tokenizer %s: vocab %d, max_length %d", tags, vocab_size, builder.max_length)
    return CellTokenizer(data=data, builder=builder, embedder=embedder, vocab_size=vocab_size,
                         n_expression_bins=fe_part.n_bin_ids, tags=tags, params=params,
                         gene_keep=gene_keep, genes_mapped=genes_mapped)


def tokenizer_tags(fg, fe, fc) -> dict[str, str]:
    """Tags naming a tokenizer's parts: ``fg``, ``fe``, ``fc`` (the Fc's label), ``order``,
    ``select``, ``combine`` (component names, ``module:Class`` for a user's),
    ``tokenizer`` (``fg/fe/fc``) and ``preset``: the Fc preset's name when the Fc is that
    preset file unchanged, else ``custom`` (``geneformer`` with another ``select.size``
    is not Geneformer's tokenizer)."""
    fg_cfg, fe_cfg, fc_cfg = to_config("fg", fg), to_config("fe", fe), to_config("fc", fc)
    label = fc_cfg.name or "custom"
    unchanged = label in preset_names("fc") and (
        OmegaConf.to_container(load_component("fc", label), resolve=True) == OmegaConf.to_container(fc_cfg, resolve=True)
    )
    tags = {"fg": str(fg_cfg.name), "fe": str(fe_cfg.name), "fc": label, "order": str(fc_cfg.order.name),
            "select": str(fc_cfg.select.name), "combine": str(fc_cfg.combine.name)}
    tags["tokenizer"] = f"{tags['fg']}/{tags['fe']}/{tags['fc']}"
    tags["preset"] = label if unchanged else "custom"
    return tags


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


def _check_panel(size: int, n_panel: int) -> None:
    """``select: panel`` needs a panel of at most L genes."""
    if n_panel > size:
        raise TokbenchError(
            f"fc.select.name=panel puts all {n_panel} genes of the panel in every sentence, more than "
            f"fc.select.size={size} (L); choose fewer genes (dataset.n_top_genes={size}) or raise fc.select.size"
        )


def catalogue(plugins: tuple[str, ...] = ()) -> str:
    """Every registered Fg, Fe and Fc part (those of the ``plugins`` modules too, imported
    first) and every Fc preset, one line each with its parameters."""
    registry.load_plugins(plugins)

    def shown(default) -> str:
        return "<required>" if default is dataclasses.MISSING else "-" if default is None else str(default).lower()

    lines = ["Tokenizer = Fg (gene identity) + Fe (expression) + Fc (select -> order -> combine)."]
    titles = {"fg": "Fg fg.name", "fe": "Fe fe.name", "select": "Fc fc.select.name",
              "order": "   fc.order.name", "combine": "   fc.combine.name"}
    for kind in ("fg", "fe", "select", "order", "combine"):
        lines.append(titles[kind])
        for name, part in registry.registered(kind).items():
            params = ", ".join(f"{k}={shown(d)}" for k, d, _ in registry.param_help(part))
            if not part.__module__.startswith("tokbench."):
                params = f"from {part.__module__}" + (f"; {params}" if params else "")
            line = f"    {name:<16}{part.description}"
            if params and len(line) + len(params) + 4 > 100:
                lines.append(line)
                lines += textwrap.wrap(f"[{params}]", 100, initial_indent=" " * 20, subsequent_indent=" " * 21)
            else:
                lines.append(f"{line}  [{params}]" if params else line)
    lines.append("Presets fc=NAME; fe=NAME / fg=NAME take a component's defaults; override e.g. fc.select.size=512")
    for name in preset_names("fc"):
        cfg = load_component("fc", name)
        recipe = f"{cfg.select.name}:{cfg.select.size} > {cfg.order.name} > {cfg.combine.name}"
        lines.append(f"    {name:<18}{recipe:<44} {preset_description('fc', name)}")
    lines.append("A part of your own: name: module:Class, or plugins: [module]; see docs/novel_tokenizer.md")
    lines.append("Token ids: PAD=0 CLS=1 MASK=2 CHROM_END=3, gene j = 4+j, chromosome group g = 4+n_genes+g.")
    return "\n".join(lines)
