"""GPT-2 (Radford et al., 2019) in the manner of nanoGPT: pre-LayerNorm decoder blocks.

Attention is written out (``q @ k^T``, ``masked_fill`` on a registered causal-mask buffer,
``softmax``, dropout, ``@ v``) rather than calling ``F.scaled_dot_product_attention``: the
models are traced into aten graphs, and the explicit form keeps every intermediate (the T x T
attention matrix above all) a separate node that a rematerialization planner can see.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["GPT2", "GPT2Config", "Block", "CausalSelfAttention", "MLP", "build_gpt2"]


@dataclass(frozen=True)
class GPT2Config:
    """Hyperparameters of a GPT-2; the defaults are GPT-2 small (124M with tied embeddings).

    Attributes:
        vocab_size: number of token ids.
        block_size: context length (positions of the learned position embedding).
        n_layer: number of transformer blocks.
        n_head: attention heads per block.
        n_embd: model width ``d_model``; a multiple of ``n_head``.
        dropout: dropout probability on embeddings, attention weights and residual branches.
        bias: biases in Linear and LayerNorm layers (GPT-2 has them).
        tie_weights: share the token embedding with the output projection.
    """

    vocab_size: int = 50257
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.1
    bias: bool = True
    tie_weights: bool = False


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with the mask as a buffer.

    Args:
        cfg: model hyperparameters.
    """

    mask: Tensor

    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        if cfg.n_embd % cfg.n_head:
            raise ValueError(f"n_embd={cfg.n_embd} is not a multiple of n_head={cfg.n_head}")
        self.n_head = cfg.n_head
        self.n_embd = cfg.n_embd
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v together
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.attn_dropout = nn.Dropout(cfg.dropout)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        n = cfg.block_size
        causal = torch.tril(torch.ones(n, n, dtype=torch.bool)).view(1, 1, n, n)  # (1, 1, n, n)
        self.register_buffer("mask", causal, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """Attend over ``x`` of shape (B, T, C), T <= block_size; returns (B, T, C)."""
        B, T, C = x.size()
        hs = C // self.n_head
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # (B, nh, T, T)
        att = att.masked_fill(~self.mask[:, :, :T, :T], float("-inf"))  # (B, nh, T, T)
        att = torch.softmax(att, dim=-1)  # (B, nh, T, T)
        att = self.attn_dropout(att)  # (B, nh, T, T)
        y = att @ v  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))  # (B, T, C)


class MLP(nn.Module):
    """Position-wise feed-forward: Linear to 4C, GELU (tanh form, as GPT-2), Linear back.

    Args:
        cfg: model hyperparameters.
    """

    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        """Apply to ``x`` of shape (B, T, C); returns (B, T, C)."""
        x = self.gelu(self.c_fc(x))  # (B, T, 4C)
        return self.dropout(self.c_proj(x))  # (B, T, C)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``.

    Args:
        cfg: model hyperparameters.
    """

    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        """Apply to ``x`` of shape (B, T, C); returns (B, T, C)."""
        x = x + self.attn(self.ln_1(x))  # (B, T, C)
        return x + self.mlp(self.ln_2(x))  # (B, T, C)


class GPT2(nn.Module):
    """GPT-2 language model: token ids in, next-token logits out.

    Args:
        cfg: model hyperparameters.
    """

    pos: Tensor

    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)  # token embedding
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)  # position embedding
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.register_buffer("pos", torch.arange(cfg.block_size), persistent=False)  # (n,)

        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
        if cfg.tie_weights:
            self.lm_head.weight = self.wte.weight

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, idx: Tensor) -> Tensor:
        """Score ``idx`` (B, T) int64 token ids, T <= block_size; returns logits (B, T, vocab)."""
        T = idx.size(1)
        tok = self.wte(idx)  # (B, T, C)
        pos = self.wpe(self.pos[:T])  # (T, C)
        x = self.drop(tok + pos)  # (B, T, C)
        for block in self.h:
            x = block(x)  # (B, T, C)
        x = self.ln_f(x)  # (B, T, C)
        return self.lm_head(x)  # (B, T, vocab)


def build_gpt2(
    batch: int,
    *,
    vocab_size: int = 50257,
    block_size: int = 1024,
    n_layer: int = 12,
    n_head: int = 12,
    n_embd: int = 768,
    dropout: float = 0.1,
    bias: bool = True,
    tie_weights: bool = False,
    seq_len: int = 256,
) -> tuple[GPT2, tuple[Tensor]]:
    """Build a :class:`GPT2` and a batch of random token ids for it.

    Args:
        batch: number of example sequences.
        vocab_size: number of token ids.
        block_size: context length.
        n_layer: number of blocks.
        n_head: attention heads.
        n_embd: model width.
        dropout: dropout probability.
        bias: biases in Linear and LayerNorm.
        tie_weights: share the token embedding with the output projection.
        seq_len: length of the example sequences, at most ``block_size``.

    Returns:
        The model and ``(idx,)`` with int64 ``idx`` of shape (batch, seq_len).
    """
    if not 1 <= seq_len <= block_size:
        raise ValueError(f"seq_len must be in [1, block_size={block_size}], got {seq_len}")
    cfg = GPT2Config(
        vocab_size=vocab_size,
        block_size=block_size,
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        dropout=dropout,
        bias=bias,
        tie_weights=tie_weights,
    )
    model = GPT2(cfg)
    idx = torch.randint(0, vocab_size, (batch, seq_len))  # (B, T) int64
    return model, (idx,)
