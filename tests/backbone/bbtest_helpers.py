"""Shared constants and data of the backbone tests (imported by conftest and tests)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # the package is importable without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT))

from backbone.methods import get_method, method_names  # noqa: E402

TINY = "open_clip:tiny:random"
SIZE = 32  # tiny's image size
PALETTE = torch.tensor(
    [[1.5, -1.0, -1.0], [-1.0, 1.5, -1.0], [-1.0, -1.0, 1.5], [1.2, 1.2, -1.0], [-1.0, 1.2, 1.2], [1.2, -1.0, 1.2]]
)
CLASS_NAMES = ["red", "green", "blue", "yellow", "cyan", "magenta"]
TRAINED_METHODS = [m for m in method_names() if get_method(m).trainer != "none"]

# Each method's own smoke config: tunes in about a second on the tiny backbone.
FAST = {m: get_method(m).smoke_config for m in method_names()}

# Schedules that learn the synthetic task well above chance on the tiny backbone (seconds
# each; the defaults are the papers' and longer). Test data, not method knowledge: a method
# is listed once it is shown to learn this task (the patch methods, whose 8 x 8 px patch on a
# random-weight 32 px backbone does not, are not).
LEARN = {
    "zeroshot": {},
    "coop": {"epochs": 20, "optimizer": "adamw", "lr": 0.02, "batch_size": 16, "n_ctx": 4},
    "cocoop": {"epochs": 4, "lr": 0.05, "batch_size": 4},
    "vpt-shallow": {"epochs": 15, "batch_size": 16, "n_tokens": 4},
    "vpt-deep": {"epochs": 15, "batch_size": 16, "n_tokens": 4},
    "padding": {"epochs": 40, "optimizer": "adamw", "lr": 1.0, "weight_decay": 0.0, "batch_size": 16, "pad": 4},
    "linear-probe": {"l2_grid": [1e-1, 1e-3, 1e-5], "max_iter": 100},
}


def make_images(n_classes: int, per_class: int, seed: int, size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, size, size) float32 'preprocessed' images and (N,) int64 labels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    images = PALETTE[labels][:, :, None, None].expand(-1, -1, size, size) + 0.4 * torch.randn(
        len(labels), 3, size, size, generator=g
    )
    for i in range(len(labels)):
        y, x = torch.randint(0, size // 2, (2,), generator=g).tolist()
        images[i, :, y:y + size // 4, x:x + size // 4] += 1.0
    return images.float().contiguous(), labels
