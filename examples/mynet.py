"""Your own model and data, as flatscope imports them: ``--model mynet:net --data mynet:digits_images``.

Run from this folder's parent with ``PYTHONPATH=examples`` (or from this folder: the working
directory is importable). Nothing here is special to flatscope: a plain ``nn.Module`` and a
function returning ``torch.utils.data.Dataset`` objects.
"""

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset


class SmallConvNet(nn.Module):
    """A 20-line custom model on 1 x 8 x 8 images: it expects image-shaped inputs."""

    def __init__(self, channels: int = 8, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.norm = nn.LayerNorm([2 * channels, 4, 4])
        self.head = nn.Linear(2 * channels * 16, classes)
        self.temperature = nn.Parameter(torch.tensor(1.0))   # a 0-d learnable scale

    def forward(self, x):
        assert x.dim() == 4, f"expected N x 1 x 8 x 8 images, got {tuple(x.shape)}"
        h = torch.relu(self.conv1(x))
        h = nn.functional.max_pool2d(torch.relu(self.conv2(h)), 2)
        return self.head(self.norm(h).flatten(1)) / self.temperature


def net(channels: int = 8):
    torch.manual_seed(0)
    return SmallConvNet(channels)


class DigitImages(Dataset):
    """scikit-learn's digits as (1 x 8 x 8 image, label) items, streamed item by item."""

    def __init__(self, train: bool):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        d = load_digits()
        X = (d.images / 16.0).astype(np.float32)[:, None]
        Xtr, Xte, ytr, yte = train_test_split(X, d.target, test_size=0.25, random_state=0, stratify=d.target)
        self.x, self.y = (Xtr, ytr) if train else (Xte, yte)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return torch.from_numpy(self.x[i]), int(self.y[i])


def digits_images():
    return {"train": DigitImages(True), "test": DigitImages(False)}
