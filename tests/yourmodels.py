"""Models and data factories a researcher would bring: used by tests/test_your_model.py, imported by
the CLI as ``yourmodels:NAME`` (the tests put this folder on sys.path, as PYTHONPATH would)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, SEQ = 11, 6


class TinyConv(nn.Module):
    """Images N x 3 x 5 x 5 -> 3 classes (no reshaping: the input must keep its shape)."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, classes)

    def forward(self, x):
        assert x.dim() == 4, x.shape
        return self.fc(torch.tanh(self.conv(x)).mean(dim=(2, 3)))


class TinyTransformer(nn.Module):
    """Token ids N x T -> logits N x T x V: embedding, causal SDPA attention, LayerNorm, GELU MLP."""

    def __init__(self, vocab: int = VOCAB, d: int = 8, heads: int = 2, seq: int = SEQ, classes: int | None = None):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.1 * torch.randn(seq, d))
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, classes or vocab)
        self.heads = heads

    def forward(self, ids):
        n, t = ids.shape
        h = self.emb(ids) + self.pos[:t]
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        split = lambda z: z.reshape(n, t, self.heads, -1).transpose(1, 2)  # noqa: E731
        a = F.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=True)
        h = self.ln(h + self.proj(a.transpose(1, 2).reshape(n, t, -1)))
        return self.head(h + self.mlp(h))


class Recurrent(nn.Module):
    """Token ids -> LSTM and GRU -> one class per sequence; returns a tuple (logits, hidden)."""

    def __init__(self, vocab: int = VOCAB, d: int = 5, classes: int = 3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.lstm = nn.LSTM(d, d, batch_first=True)
        self.gru = nn.GRU(d, d, batch_first=True)
        self.fc = nn.Linear(d, classes)

    def forward(self, ids):
        h, _ = self.lstm(self.emb(ids))
        h, last = self.gru(h)
        return self.fc(h[:, -1]), last


class DictOut(nn.Module):
    """Keyword inputs (features, mask) and a dict output with two heads."""

    def __init__(self, d: int = 4, classes: int = 3):
        super().__init__()
        self.body = nn.Linear(d, 6)
        self.cls = nn.Linear(6, classes)
        self.aux = nn.Linear(6, 1)

    def forward(self, features, mask):
        h = torch.tanh(self.body(features * mask))
        return {"scores": self.cls(h), "aux": self.aux(h)}


class FrozenTied(nn.Module):
    """A frozen first layer and an output layer tied to the input embedding."""

    def __init__(self, vocab: int = VOCAB, d: int = 4):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.frozen = nn.Linear(d, d)
        self.frozen.requires_grad_(False)
        self.scale = nn.Parameter(torch.tensor(1.3))   # 0-d learnable temperature
        self.out = nn.Linear(d, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        return self.out(torch.tanh(self.frozen(self.emb(ids)))) * self.scale


def token_data(n: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    return ids


class TokenDataset(torch.utils.data.Dataset):
    """A map-style dataset of dict items {input_ids, labels}; some label positions ignored (-100)."""

    def __init__(self, n: int = 24, seed: int = 0):
        self.ids = token_data(n, seed)
        self.labels = self.ids.clone()
        self.labels[::3, -2:] = -100          # padding: unequal token counts per batch

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


class ImageDataset(torch.utils.data.Dataset):
    def __init__(self, n: int = 20, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, 5, 5, generator=g)
        self.y = torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class TransformerKw(TinyTransformer):
    """The same model taking keyword input_ids (as dict items are passed)."""

    def forward(self, input_ids):
        return super().forward(input_ids)


# ------------------------------------------------------------------ factories for the CLI
def transformer(**kw):
    torch.manual_seed(0)
    return TransformerKw(**kw)


def conv(**kw):
    torch.manual_seed(0)
    return TinyConv(**kw)


def tokens(n: int = 24, test: int = 12):
    return {"train": TokenDataset(n, 0), "test": TokenDataset(test, 1)}


def images(n: int = 20):
    return {"train": ImageDataset(n, 0), "test": ImageDataset(10, 1)}


def image_pair(n: int = 20):
    d = ImageDataset(n, 0)
    return d.x, d.y


def not_data():
    return 42


def mean_abs(outputs, targets):
    """A custom loss: mean absolute error against one-hot labels."""
    return (outputs.softmax(-1) - F.one_hot(targets, outputs.shape[-1]).to(outputs.dtype)).abs().mean()


def vector_loss(outputs, targets):
    return (outputs - 1).abs().mean(0)


def nan_loss(outputs, targets):
    return outputs.sum() * float("nan")


def top2(outputs, targets):
    """A custom metric: top-2 accuracy."""
    return (outputs.topk(2, dim=-1).indices == targets[:, None]).any(-1).float().mean()
