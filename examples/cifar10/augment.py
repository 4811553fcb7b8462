"""Training-batch augmentation on the device, without torchvision.

:func:`random_crop_flip` is torchvision's ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip()`` for a
whole batch at once, on the batch's device (no per-image work on the CPU, no DataLoader workers needed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop_flip(images: torch.Tensor, padding: int = 4) -> torch.Tensor:
    """Per-sample random crop of ``images`` ``(n, c, h, w)`` zero-padded by ``padding`` on every side, then
    a horizontal flip with probability 1/2, drawn from torch's global RNG."""
    n, _, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    top = torch.randint(0, 2 * padding + 1, (n, 1), device=images.device)
    left = torch.randint(0, 2 * padding + 1, (n, 1), device=images.device)
    rows = top + torch.arange(h, device=images.device)  # (n, h)
    cols = left + torch.arange(w, device=images.device)  # (n, w)
    batch = torch.arange(n, device=images.device).view(n, 1, 1)
    # Advanced indexing puts the indexed dims first: (n, h, w, c), back to (n, c, h, w).
    cropped = padded.permute(0, 2, 3, 1)[batch, rows.view(n, h, 1), cols.view(n, 1, w)].permute(0, 3, 1, 2)
    flip = torch.rand(n, device=images.device) < 0.5
    return torch.where(flip.view(n, 1, 1, 1), cropped.flip(-1), cropped)
