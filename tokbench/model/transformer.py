"""A small pre-norm transformer encoder that turns cell sentences into cell-type logits.

The tokenizer's embedder produces (B, T, d_model) token vectors; this module adds a
positional encoding, runs ``n_layers`` pre-norm blocks whose attention is
``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on a GPU), pools one
vector per cell and maps it to class logits with a linear head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tokbench.errors import TokbenchError
from tokbench.model.config import ModelConfig, validate_model_config
from tokbench.tokenizers.base import CellSentences


class SelfAttention(nn.Module):
    """Multi-head self-attention over one batch of padded sentences."""

    def __init__(self, d_model: int, n_heads: int, dropout: float, attention_dropout: float = 0.0):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.attn_dropout = attention_dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        """``x`` (B, T, C); ``attn_mask`` bool (B, 1, 1, T), True where a key may be attended."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q = q.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)
        v = v.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: Linear → GELU → Linear → dropout."""

    def __init__(self, d_model: int, hidden: int, dropout: float):
        super().__init__()
        self.fc = nn.Linear(d_model, hidden)
        self.proj = nn.Linear(hidden, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg.d_model, cfg.n_heads, cfg.dropout, cfg.attention_dropout)
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg.d_model, cfg.mlp_ratio * cfg.d_model, cfg.dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask)
        return x + self.mlp(self.ln_2(x))


def sincos_positions(n_positions: int, d_model: int) -> torch.Tensor:
    """Fixed sinusoidal encodings (Vaswani et al. 2017), float32 (n_positions, d_model)."""
    position = torch.arange(n_positions, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(n_positions, d_model)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)[:, : d_model // 2]
    return table


class TransformerEncoder(nn.Module):
    """Positional encoding + pre-norm blocks + final LayerNorm over (B, T, d_model) inputs."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.d_model = cfg.d_model
        self.max_positions = cfg.max_positions
        self.pos_encoding = cfg.pos_encoding
        if cfg.pos_encoding == "learned":
            self.pos_embedding = nn.Embedding(cfg.max_positions, cfg.d_model)
        elif cfg.pos_encoding == "sincos":
            # Not persistent: it is a pure function of the config, so checkpoints stay small.
            self.register_buffer("pos_table", sincos_positions(cfg.max_positions, cfg.d_model), persistent=False)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """``x`` float (B, T, d_model), ``padding_mask`` bool (B, T) True at PAD → hidden (B, T, d_model)."""
        T = x.shape[1]
        if T > self.max_positions:
            raise TokbenchError(
                f"model.max_positions: a batch has sentences of {T} tokens but max_positions is "
                f"{self.max_positions}; raise model.max_positions or lower the tokenizer's max_length"
            )
        if self.pos_encoding == "learned":
            x = x + self.pos_embedding.weight[:T]
        elif self.pos_encoding == "sincos":
            x = x + self.pos_table[:T].to(x.dtype)
        x = self.dropout(x)
        # SDPA's boolean mask is True where attention is allowed; broadcast over heads and queries.
        attn_mask = ~padding_mask[:, None, None, :]
        for block in self.blocks:
            x = block(x, attn_mask)
        return self.ln_f(x)


def pool(hidden: torch.Tensor, padding_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """One vector per cell from hidden states (B, T, d) → (B, d).

    ``cls``: position 0. ``mean``: the mean over non-pad positions (CLS included).
    """
    if pooling == "cls":
        return hidden[:, 0]
    keep = (~padding_mask).unsqueeze(-1).to(hidden.dtype)
    return (hidden * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1.0)


class CellClassifier(nn.Module):
    """Tokenizer embedder → transformer encoder → pooling → linear head.

    ``embedder`` is the tokenizer's module mapping ``CellSentences`` to float
    (B, T, d_model); it becomes a submodule, so its trainable parameters are optimised and
    checkpointed with the rest. Its own initialisation (e.g. frozen pretrained gene vectors)
    is left untouched.
    """

    def __init__(self, embedder: nn.Module, model_cfg: ModelConfig, n_classes: int):
        super().__init__()
        validate_model_config(model_cfg)
        if n_classes < 2:
            raise TokbenchError(f"a classifier needs at least two classes, got {n_classes}")
        self.embedder = embedder
        self.encoder = TransformerEncoder(model_cfg)
        self.head = nn.Linear(model_cfg.d_model, n_classes)
        self.pooling = model_cfg.pooling
        self.d_model = model_cfg.d_model
        self._init_weights(model_cfg.n_layers)

    def _init_weights(self, n_layers: int) -> None:
        # GPT-2 style: small normal weights, and residual projections scaled down with depth so
        # the residual stream's variance does not grow with n_layers.
        for module in [self.encoder, self.head]:
            for m in module.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, mean=0.0, std=0.02)
                    nn.init.zeros_(m.bias)
                elif isinstance(m, nn.Embedding):
                    nn.init.normal_(m.weight, mean=0.0, std=0.02)
        for name, p in self.encoder.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layers))

    def hidden_states(self, sentences: CellSentences) -> torch.Tensor:
        """Final-layer token states, float (B, T, d_model); PAD positions hold unused values."""
        x = self.embedder(sentences)
        if x.shape[-1] != self.d_model:
            raise TokbenchError(
                f"model.d_model: the tokenizer embeds tokens in {x.shape[-1]} dimensions but "
                f"model.d_model is {self.d_model}; build the tokenizer with the same d_model"
            )
        return self.encoder(x, sentences.padding_mask)

    def cell_embedding(self, sentences: CellSentences) -> torch.Tensor:
        """The pooled cell representation fed to the head, float (B, d_model)."""
        return pool(self.hidden_states(sentences), sentences.padding_mask, self.pooling)

    def forward(self, sentences: CellSentences) -> torch.Tensor:
        """Class logits, float (B, n_classes)."""
        return self.head(self.cell_embedding(sentences))
