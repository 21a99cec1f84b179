"""A torchvision ResNet-18 (10 classes) and an .npz of real images: scikit-learn's digits, upsampled to
3 x 32 x 32 (CIFAR-shaped). Writes the state_dict and the arrays.

    python examples/resnet18_digits.py runs/resnet18.pt runs/digits32.npz [N]
"""

import sys

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from sklearn.datasets import load_digits


def main(weights: str, images: str, n: int = 256) -> None:
    d = load_digits()
    x = torch.from_numpy((d.images[:n] / 16.0).astype(np.float32))[:, None]
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    np.savez(images, X=x.numpy(), y=d.target[:n])
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    torch.save(model.state_dict(), weights)
    print(f"{weights}: ResNet-18, {sum(p.numel() for p in model.parameters()):,} parameters; "
          f"{images}: {tuple(x.shape)} images")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:4]))
