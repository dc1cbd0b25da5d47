"""``stdlib_lm``: a small byte-level GPT trained on the Python standard library's own source.

Corpus: the ``.py`` files under ``sysconfig.get_paths()["stdlib"]`` (no site-packages/dist-packages,
no test directories, no machine-generated ``_sysconfigdata*``), sorted by relative path, the first
``task.max_files`` of them. Split by file: file k (0-based, in that order) is held out when
k % 10 == 9 (with fewer than 10 files, the last one is). Train files are concatenated byte-wise into
one uint8 tensor, eval files into another; the corpus is cached per process.

Samples: sample i is the window of seq_len + 1 bytes starting at byte i * seq_len (inputs: the first
seq_len bytes, targets: the last seq_len, both int64); ``train_size`` / ``eval_size`` is the number
of such windows, (bytes - 1) // seq_len.

Model: decoder-only transformer - token + learned positional embeddings, ``n_layers`` pre-LayerNorm
blocks (causal multi-head self-attention, GELU MLP of width 4 d_model), final LayerNorm and an
UNTIED output head (a separate 256 x d_model matrix; no shared parameters, which keeps sharded
optimizers and checkpoint layouts simple). No dropout. GPT-2 style init N(0, 0.02), residual
projections scaled by 1/sqrt(2 n_layers), zero biases. LayerNorm parameters are named ``ln_*``.

Loss: mean next-byte cross-entropy over all tokens of the batch. ``eval_sums`` counts TOKENS:
``count`` = samples x seq_len, ``loss_sum`` = summed per-token cross-entropy, ``correct`` = correctly
predicted next bytes, so loss_sum / count is the per-token loss (nats/byte) and correct / count the
next-byte accuracy.
"""

from __future__ import annotations

import math
import os
import sysconfig
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dist_opt.config.schema import TaskConfig
from dist_opt.tasks import (
    check_indices,
    cross_entropy_sums,
    eval_forward,
    new_generator,
    on_meta,
    to_model_device,
)
from dist_opt.tasks.base import Batch, Task

VOCAB = 256
EVAL_EVERY = 10
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})


@dataclass(frozen=True)
class Corpus:
    """Train/eval bytes of the stdlib corpus and which files went where (paths relative to ``root``)."""

    root: str
    train_files: tuple[str, ...]
    eval_files: tuple[str, ...]
    train: torch.Tensor
    eval: torch.Tensor


_CACHE: dict[tuple[str, int], Corpus] = {}
_LOCK = threading.Lock()


def stdlib_root() -> str:
    """The running interpreter's standard library directory."""
    return sysconfig.get_paths()["stdlib"]


def stdlib_files(root: str) -> list[str]:
    """All eligible ``.py`` files under ``root``, as sorted relative POSIX paths."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS and not d.startswith(".")]
        rel_dir = Path(dirpath).relative_to(root)
        for f in filenames:
            if f.endswith(".py") and not f.startswith("_sysconfigdata"):
                found.append((rel_dir / f).as_posix())
    return sorted(found)


def is_eval_file(k: int, n: int) -> bool:
    """Whether file k of n (in sorted order) belongs to the held-out split."""
    return k % EVAL_EVERY == EVAL_EVERY - 1 or (n < EVAL_EVERY and n > 1 and k == n - 1)


def _concat(root: str, files: list[str]) -> torch.Tensor:
    data = bytearray()
    for f in files:
        data += (Path(root) / f).read_bytes()
    return torch.frombuffer(data, dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)


def load_corpus(max_files: int, root: str | None = None) -> Corpus:
    """The corpus of the first ``max_files`` stdlib files (cached per process, keyed by root and max_files)."""
    root = root or stdlib_root()
    key = (root, max_files)
    with _LOCK:
        hit = _CACHE.get(key)
        if hit is not None:
            return hit
        files = stdlib_files(root)[:max_files]
        train = [f for k, f in enumerate(files) if not is_eval_file(k, len(files))]
        held = [f for k, f in enumerate(files) if is_eval_file(k, len(files))]
        corpus = Corpus(root, tuple(train), tuple(held), _concat(root, train), _concat(root, held))
        _CACHE[key] = corpus
        return corpus


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.proj = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.ln_2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ByteGPT(nn.Module):
    """Decoder-only byte-level transformer: (B, T) int64 bytes -> (B, T, 256) next-byte logits."""

    def __init__(self, seq_len: int, d_model: int, n_layers: int, n_heads: int) -> None:
        super().__init__()
        self.seq_len = seq_len
        self.tok_emb = nn.Embedding(VOCAB, d_model)
        self.pos_emb = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, VOCAB, bias=False)

    @torch.no_grad()
    def init_weights(self, g: torch.Generator) -> ByteGPT:
        """GPT-2 style init drawn from ``g`` (every parameter and buffer is written)."""
        residual_std = 0.02 / math.sqrt(2 * len(self.blocks))
        for name, m in self.named_modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                std = residual_std if name.endswith(".proj") else 0.02
                m.weight.normal_(0.0, std, generator=g)
                bias = getattr(m, "bias", None)
                if bias is not None:
                    bias.zero_()
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()
        return self

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.seq_len:
            raise ValueError(f"sequence of {t} tokens is longer than task.seq_len={self.seq_len}")
        pos = torch.arange(t, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def windows(data: torch.Tensor, idx: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) int64 (N, seq_len) for the windows starting at idx * seq_len."""
    rows = data[idx.unsqueeze(1) * seq_len + torch.arange(seq_len + 1)].long()
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


class StdlibLMTask(Task):
    """Next-byte prediction on the standard library's source; ``tokens_per_sample`` = seq_len."""

    name = "stdlib_lm"
    has_accuracy = True

    def __init__(self, cfg: TaskConfig, seed: int) -> None:
        self.cfg = cfg
        self.seed = int(seed)
        self.seq_len = cfg.seq_len
        self.tokens_per_sample = cfg.seq_len
        self.corpus = load_corpus(cfg.max_files)
        for split, data in (("train", self.corpus.train), ("eval", self.corpus.eval)):
            if len(data) < self.seq_len + 1:
                raise ValueError(
                    f"task.max_files={cfg.max_files}: the {split} split of the stdlib corpus has {len(data)} "
                    f"bytes, fewer than task.seq_len + 1 = {self.seq_len + 1}; raise task.max_files"
                )

    def build_model(self) -> nn.Module:
        c = self.cfg
        model = on_meta(lambda: ByteGPT(c.seq_len, c.d_model, c.n_layers, c.n_heads))
        return model.init_weights(new_generator(self.seed, "stdlib_lm.model"))

    @property
    def train_size(self) -> int:
        return (len(self.corpus.train) - 1) // self.seq_len

    @property
    def eval_size(self) -> int:
        return (len(self.corpus.eval) - 1) // self.seq_len

    def train_batch(self, indices: torch.Tensor) -> Batch:
        idx = check_indices(indices, self.train_size, "stdlib_lm train")
        return windows(self.corpus.train, idx, self.seq_len)

    def eval_batch(self, indices: torch.Tensor) -> Batch:
        idx = check_indices(indices, self.eval_size, "stdlib_lm eval")
        return windows(self.corpus.eval, idx, self.seq_len)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        x, y = to_model_device(batch, model)
        return F.cross_entropy(model(x).float().reshape(-1, VOCAB), y.reshape(-1))

    @torch.no_grad()
    def eval_sums(self, model: nn.Module, batch: Batch) -> dict[str, float]:
        """Sums over TOKENS: per-token cross-entropy summed, token count, correct next-byte predictions."""
        logits, y = eval_forward(model, batch)
        return cross_entropy_sums(logits.reshape(-1, VOCAB), y.reshape(-1))
