"""A faithful re-implementation of the paper's training pipeline, to measure netslim against.

The official main.py feeds torchvision's CIFAR10 through per-sample PIL transforms
(Pad(4), RandomCrop(32), RandomHorizontalFlip, ToTensor, Normalize) and a standard
DataLoader (batch 64, shuffled; one worker and pinned memory on CUDA, none on CPU), and
trains in fp32 NCHW with ``updateBN()`` adding ``lam * sign(gamma)`` after backward.
torchvision is not a netslim dependency, so the same transforms are written here with
Pillow and numpy, one image at a time, exactly as torchvision applies them.
"""

from __future__ import annotations

import random
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from netslim.engine.sparsity import add_bn_l1_grad

MEAN = np.array([0.4914, 0.4822, 0.4465], dtype=np.float32)
STD = np.array([0.2023, 0.1994, 0.2010], dtype=np.float32)


class PerSampleCifar(torch.utils.data.Dataset):
    """uint8 NCHW images served one by one through PIL transforms, as torchvision does."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images = images.permute(0, 2, 3, 1).numpy()  # HWC, as torchvision stores CIFAR
        self.labels = labels.tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = Image.fromarray(self.images[i])
        img = ImageOps.expand(img, border=4, fill=0)  # Pad(4)
        top, left = random.randint(0, 8), random.randint(0, 8)  # RandomCrop(32)
        img = img.crop((left, top, left + 32, top + 32))
        if random.random() < 0.5:  # RandomHorizontalFlip
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        x = np.asarray(img, dtype=np.float32) / 255.0  # ToTensor
        x = (x - MEAN) / STD  # Normalize
        return torch.from_numpy(x.transpose(2, 0, 1).copy()), self.labels[i]


def reference_loader(
    images: torch.Tensor, labels: torch.Tensor, device: torch.device, batch_size: int = 64
) -> torch.utils.data.DataLoader:
    cuda = device.type == "cuda"
    return torch.utils.data.DataLoader(
        PerSampleCifar(images, labels),
        batch_size=batch_size,
        shuffle=True,
        num_workers=1 if cuda else 0,
        pin_memory=cuda,
    )


def reference_train(
    model: torch.nn.Module, loader, device: torch.device, lam: float, max_images: int | None = None
) -> float:
    """One epoch of the official loop; returns images/s."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    model.train()
    seen, start = 0, time.perf_counter()
    for batch_idx, (data, target) in enumerate(loader):
        data, target = data.to(device), target.to(device)
        optimizer.zero_grad()
        output = model(data)
        loss = F.cross_entropy(output, target)
        loss.backward()
        add_bn_l1_grad(model, lam)  # updateBN()
        optimizer.step()
        if batch_idx % 100 == 0:
            loss.item()  # the official loop prints the loss every log_interval batches
        seen += len(target)
        if max_images and seen >= max_images:
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)
