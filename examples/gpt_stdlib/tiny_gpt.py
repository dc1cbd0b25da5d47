"""A GPT-style byte model on the Python standard library's source, as a dist-opt ``Task``.

The config names this module by import path (``task.name: tiny_gpt:TinyGPTTask``); its free options
(``task.options``) size the model. Every rank imports it, so run from this directory (the current
directory is importable) or install it as a package.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dist_opt import Task
from dist_opt.tasks.stdlib_lm import load_corpus

VOCAB = 256


class TinyGPT(nn.Module):
    def __init__(self, seq_len: int, d_model: int, n_layers: int, n_heads: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, d_model)
        self.pos = nn.Parameter(torch.randn(seq_len, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d_model, n_heads, 4 * d_model, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, VOCAB, bias=False)
        self.register_buffer(
            "mask", nn.Transformer.generate_square_subsequent_mask(seq_len), persistent=False
        )

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.tok(idx) + self.pos[:t]
        return self.head(self.ln_f(self.blocks(x, mask=self.mask[:t, :t], is_causal=True)))


class TinyGPTTask(Task):
    """Next-byte prediction; sample i is the i-th window of ``seq_len + 1`` bytes."""

    def __init__(self, cfg, seed: int) -> None:
        opts = dict(cfg.options)
        self.seq_len = int(opts.get("seq_len", 64))
        self.dims = (int(opts.get("d_model", 64)), int(opts.get("n_layers", 2)), int(opts.get("n_heads", 4)))
        self.seed = seed
        self.tokens_per_sample = self.seq_len
        self.corpus = load_corpus(int(opts.get("max_files", 200)))

    def build_model(self) -> nn.Module:
        with torch.random.fork_rng():  # the same initial weights on every rank, whatever its RNG
            torch.manual_seed(self.seed)
            return TinyGPT(self.seq_len, *self.dims)

    @property
    def train_size(self) -> int:
        return (len(self.corpus.train) - 1) // self.seq_len

    @property
    def eval_size(self) -> int:
        return (len(self.corpus.eval) - 1) // self.seq_len

    def _windows(self, data: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = data[idx.long().unsqueeze(1) * self.seq_len + torch.arange(self.seq_len + 1)].long()
        return rows[:, :-1], rows[:, 1:]

    def train_batch(self, indices: torch.Tensor):
        return self._windows(self.corpus.train, indices)

    def eval_batch(self, indices: torch.Tensor):
        return self._windows(self.corpus.eval, indices)

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))

    @torch.no_grad()
    def eval_sums(self, model: nn.Module, batch) -> dict[str, float]:
        x, y = batch
        logits = model(x).reshape(-1, VOCAB)
        loss = F.cross_entropy(logits, y.reshape(-1), reduction="sum")
        correct = (logits.argmax(-1) == y.reshape(-1)).sum()
        return {"loss_sum": float(loss), "count": float(y.numel()), "correct": float(correct)}
