"""The transformer encoder: attention, padding, pooling, positional encodings, config checks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tokbench.errors import TokbenchError
from tokbench.model import CellClassifier, ModelConfig, validate_model_config
from tokbench.model.transformer import SelfAttention, pool
from tokbench.tokenizers.base import CLS, N_SPECIAL, PAD, CellSentences

N_GENES = 20


class GeneExpressionEmbedder(nn.Module):
    """Stand-in Fg + Fe: gene embedding plus a linear map of the expression value."""

    def __init__(self, d_model: int):
        super().__init__()
        self.gene = nn.Embedding(N_SPECIAL + N_GENES, d_model)
        self.expression = nn.Linear(1, d_model)

    def forward(self, s: CellSentences) -> torch.Tensor:
        value = self.expression(s.expression.unsqueeze(-1)) * (~s.special).unsqueeze(-1)
        return self.gene(s.gene_tokens) + value


def make_sentences(lengths: list[int], extra_pad: int = 0, seed: int = 0) -> CellSentences:
    """CLS + ``length`` gene tokens per cell, padded to the longest plus ``extra_pad``."""
    g = torch.Generator().manual_seed(seed)
    T = 1 + max(lengths) + extra_pad
    B = len(lengths)
    gene_tokens = torch.full((B, T), PAD, dtype=torch.long)
    expression = torch.zeros(B, T)
    for i, n in enumerate(lengths):
        gene_tokens[i, 0] = CLS
        gene_tokens[i, 1 : 1 + n] = N_SPECIAL + torch.randperm(N_GENES, generator=g)[:n]
        expression[i, 1 : 1 + n] = torch.rand(n, generator=g) * 3
    padding = gene_tokens == PAD
    return CellSentences(gene_tokens, expression, special=gene_tokens < N_SPECIAL, padding_mask=padding)


def pad_more(s: CellSentences, extra: int) -> CellSentences:
    """The same sentences with ``extra`` more PAD columns on the right."""
    B = s.gene_tokens.shape[0]
    return CellSentences(
        gene_tokens=torch.cat([s.gene_tokens, torch.full((B, extra), PAD)], 1),
        expression=torch.cat([s.expression, torch.zeros(B, extra)], 1),
        special=torch.cat([s.special, torch.ones(B, extra, dtype=torch.bool)], 1),
        padding_mask=torch.cat([s.padding_mask, torch.ones(B, extra, dtype=torch.bool)], 1),
    )


def build(**overrides) -> CellClassifier:
    torch.manual_seed(0)
    cfg = ModelConfig(**{"d_model": 16, "n_layers": 2, "n_heads": 4, **overrides})
    return CellClassifier(GeneExpressionEmbedder(cfg.d_model), cfg, n_classes=3).eval()


def test_sdpa_attention_matches_naive_attention_with_padding_mask():
    torch.manual_seed(0)
    B, T, C, H = 3, 7, 16, 4
    attn = SelfAttention(C, H, dropout=0.0).eval()
    x = torch.randn(B, T, C)
    padding = torch.zeros(B, T, dtype=torch.bool)
    padding[0, 5:] = True
    padding[2, 2:] = True
    got = attn(x, ~padding[:, None, None, :])

    q, k, v = attn.qkv(x).split(C, dim=2)
    heads = lambda t: t.view(B, T, H, C // H).transpose(1, 2)  # noqa: E731
    q, k, v = heads(q), heads(k), heads(v)
    scores = q @ k.transpose(-2, -1) / math.sqrt(C // H)
    scores = scores.masked_fill(padding[:, None, None, :], float("-inf"))
    naive = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C)
    expected = attn.proj(naive)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("pos_encoding", ["learned", "sincos", "none"])
def test_extra_padding_does_not_change_logits(pooling, pos_encoding):
    model = build(pooling=pooling, pos_encoding=pos_encoding)
    s = make_sentences([5, 2, 8])
    with torch.no_grad():
        base = model(s)
        padded = model(pad_more(s, 6))
    assert base.shape == (3, 3)
    torch.testing.assert_close(base, padded, atol=1e-5, rtol=1e-5)


def test_a_cell_alone_equals_the_cell_in_a_padded_batch():
    model = build(pooling="mean")
    batch = make_sentences([3, 9])
    alone = CellSentences(*(t[:1, :4] for t in (batch.gene_tokens, batch.expression, batch.special, batch.padding_mask)))
    with torch.no_grad():
        torch.testing.assert_close(model(batch)[:1], model(alone), atol=1e-5, rtol=1e-5)


def test_cls_pooling_reads_position_zero_and_mean_pooling_skips_pads():
    s = make_sentences([4, 1, 6])
    for pooling in ("cls", "mean"):
        model = build(pooling=pooling)
        with torch.no_grad():
            hidden = model.hidden_states(s)
            emb = model.cell_embedding(s)
        if pooling == "cls":
            torch.testing.assert_close(emb, hidden[:, 0])
        else:
            for i, n in enumerate([4, 1, 6]):
                torch.testing.assert_close(emb[i], hidden[i, : 1 + n].mean(0))
    # pool() on its own: pads may hold anything
    hidden = torch.randn(2, 4, 3)
    mask = torch.tensor([[False, False, True, True], [False, False, False, False]])
    hidden[0, 2:] = 1e6
    torch.testing.assert_close(pool(hidden, mask, "mean")[0], hidden[0, :2].mean(0))


def test_positional_encoding_none_makes_mean_pooling_order_free():
    s = make_sentences([6, 6])
    perm = torch.tensor([0, 3, 1, 6, 2, 5, 4])  # keep CLS first, shuffle the genes
    shuffled = CellSentences(s.gene_tokens[:, perm], s.expression[:, perm], s.special[:, perm], s.padding_mask[:, perm])
    with torch.no_grad():
        free = build(pooling="mean", pos_encoding="none")
        torch.testing.assert_close(free(s), free(shuffled), atol=1e-5, rtol=1e-5)
        for pos in ("learned", "sincos"):
            model = build(pooling="mean", pos_encoding=pos)
            if pos == "learned":  # the default init is tiny; make positions matter visibly
                nn.init.normal_(model.encoder.pos_embedding.weight, std=1.0)
            assert not torch.allclose(model(s), model(shuffled), atol=1e-4)


def test_gradients_reach_embedder_and_dropout_is_active_in_train_mode():
    model = build(dropout=0.5).train()
    s = make_sentences([4, 5])
    out1, out2 = model(s), model(s)
    assert not torch.allclose(out1, out2)
    out1.sum().backward()
    assert model.embedder.gene.weight.grad is not None and model.embedder.gene.weight.grad.abs().sum() > 0


def test_sentence_longer_than_max_positions_is_refused():
    model = build(max_positions=5)
    with pytest.raises(TokbenchError, match="max_positions"):
        model(make_sentences([7]))


def test_embedder_width_must_match_d_model():
    cfg = ModelConfig(d_model=16, n_heads=4)
    model = CellClassifier(GeneExpressionEmbedder(8), cfg, n_classes=2)
    with pytest.raises(TokbenchError, match="model.d_model"):
        model(make_sentences([3]))


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"d_model": 30, "n_heads": 4}, "model.n_heads"),
        ({"pooling": "max"}, "model.pooling"),
        ({"pos_encoding": "rope"}, "model.pos_encoding"),
        ({"n_layers": 0}, "model.n_layers"),
        ({"dropout": 1.0}, "model.dropout"),
    ],
)
def test_invalid_model_config_names_the_key(overrides, key):
    with pytest.raises(TokbenchError, match=key.replace(".", r"\.")) as err:
        validate_model_config(ModelConfig(**overrides))
    if "pooling" in overrides:
        assert "'cls'" in str(err.value) and "'mean'" in str(err.value)
    with pytest.raises(TokbenchError):
        CellClassifier(GeneExpressionEmbedder(16), ModelConfig(**overrides), n_classes=2)


def test_structured_omegaconf_config_is_accepted():
    from omegaconf import OmegaConf

    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), {"d_model": 16, "pooling": "mean"})
    validate_model_config(cfg)
    model = CellClassifier(GeneExpressionEmbedder(16), cfg, n_classes=2).eval()
    assert model(make_sentences([2, 3])).shape == (2, 2)
