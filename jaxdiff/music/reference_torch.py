"""The book's music model and sampling loop in PyTorch, written from its specification.

For parity tests and the speed comparison only (``torch`` is imported here and nowhere else in
:mod:`jaxdiff.music`). Module and parameter names are the book's, so its ``state_dict`` has the
book's 83 entries, and :func:`jaxdiff.music.music_params_to_torch` output loads with
``strict=True``.

Example::

    net = book_model(num_layers=2, num_heads=2, embed_dim=32, max_len=64)
    net.load_state_dict(music_params_to_torch(params))
    logits = net(torch.from_numpy(tokens).long())
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from jaxdiff.music.events import NUM_EVENTS, PAD_ID, VOCAB_SIZE


class _Attention(nn.Module):
    def __init__(self, embed_dim: int, num_heads: int, max_len: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.register_buffer("bias", torch.tril(torch.ones(max_len, max_len)).view(1, 1, max_len, max_len))
        self.c_attn = nn.Linear(embed_dim, 3 * embed_dim)
        self.c_proj = nn.Linear(embed_dim, embed_dim)
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (a.view(b, t, self.num_heads, d // self.num_heads).transpose(1, 2) for a in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
        att = self.attn_dropout(F.softmax(att, dim=-1))
        y = (att @ v).transpose(1, 2).contiguous().view(b, t, d)
        return self.resid_dropout(self.c_proj(y))


class _MLP(nn.Module):
    def __init__(self, embed_dim: int, dropout: float):
        super().__init__()
        self.c_fc = nn.Linear(embed_dim, 4 * embed_dim)
        self.c_proj = nn.Linear(4 * embed_dim, embed_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class _Block(nn.Module):
    def __init__(self, embed_dim: int, num_heads: int, max_len: int, dropout: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(embed_dim)
        self.attn = _Attention(embed_dim, num_heads, max_len, dropout)
        self.ln_2 = nn.LayerNorm(embed_dim)
        self.mlp = _MLP(embed_dim, dropout)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class BookMusicModel(nn.Module):
    """Embeddings + pre-LN blocks + ``ln_f`` + ``lm_head`` (no bias), the book's layout."""

    def __init__(self, num_layers=6, num_heads=8, embed_dim=512, vocab_size=VOCAB_SIZE, max_len=2048, dropout=0.1):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, embed_dim),
            wpe=nn.Embedding(max_len, embed_dim),
            drop=nn.Dropout(dropout),
            h=nn.ModuleList([_Block(embed_dim, num_heads, max_len, dropout) for _ in range(num_layers)]),
            ln_f=nn.LayerNorm(embed_dim),
        ))  # fmt: skip
        self.lm_head = nn.Linear(embed_dim, vocab_size, bias=False)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * num_layers))

    def forward(self, idx):
        t = idx.size(1)
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


def book_model(**kwargs) -> BookMusicModel:
    return BookMusicModel(**kwargs)


def book_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``CrossEntropyLoss(ignore_index=389)`` over all positions, as the book trains."""
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=PAD_ID)


def book_sample(model: BookMusicModel, prompt: torch.Tensor, seq_length: int, temperature: float = 1.0,
                greedy: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """The book's sampling loop: the whole prefix again at every step (no cache, no no_grad).

    ``prompt`` ``[B, P]``; returns ``[B, seq_length]`` (the length counts the prompt). Draws from
    ``softmax(logits / T)`` restricted to the 388 events (renormalised), or its argmax.
    """
    model.eval()
    b, p = prompt.shape
    gen = torch.full((b, seq_length), PAD_ID, dtype=torch.long, device=prompt.device)
    gen[:, :p] = prompt
    for idx in range(p, seq_length):
        logits = model(gen[:, :idx])
        probs = F.softmax(logits / temperature, dim=-1)[..., :NUM_EVENTS][:, idx - 1]
        if greedy:
            gen[:, idx] = probs.argmax(-1)
        else:
            gen[:, idx] = torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=generator)[:, 0]
    return gen
