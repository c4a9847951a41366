"""fixed-patch: a learned p x p patch added at the image's top-left corner (Bahng et al.,
"Exploring Visual Prompts for Adapting Large-Scale Models", 2022; the authors'
``FixedPatchPrompter``).

One parameter ``patch`` (1, 3, p, p), init randn; the prompt is zeros (1, 3, S, S) with the
patch at rows 0..p-1, columns 0..p-1, added to the preprocessed, normalised image. Head,
text template, class-name rule and training defaults as padding (``padding.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..errors import ConfigError
from .padding import PixelPromptConfig, PixelPromptModule, pixel_head_field, pixel_template_field, scaled_prompt_size
from .registry import MethodSpec, Trainer, register

if TYPE_CHECKING:
    from ..loading import Backbone


class FixedPatchConfig(PixelPromptConfig):
    __doc__ = PixelPromptConfig.__doc__

    prompt_size: int | None = Field(
        None,
        ge=1,
        le=512,
        description="Patch side p in pixels, at the image's top-left corner. None: 30 at 224 px (the authors' "
        "code's prompt_size, shared by its three designs), scaled to the backbone's image size.",
    )
    head: Literal["auto", "clip", "linear"] = pixel_head_field()
    template: str = pixel_template_field()

    def size_for(self, image_size: int) -> int:
        return self.prompt_size if self.prompt_size is not None else scaled_prompt_size(image_size)


class FixedPatchModule(PixelPromptModule):
    def __init__(self, backbone: "Backbone", classes: list[str], config: FixedPatchConfig):
        super().__init__(backbone, classes, config)
        self.image_size = backbone.image_size
        self.prompt_size = config.size_for(self.image_size)
        self.patch = nn.Parameter(torch.randn(1, 3, self.prompt_size, self.prompt_size))
        self._build_head(backbone, classes, config)

    @classmethod
    def check_backbone(cls, backbone: "Backbone", config: FixedPatchConfig) -> None:
        p, s = config.size_for(backbone.image_size), backbone.image_size
        if p > s:
            raise ConfigError(f"prompt_size={p} is larger than the image size {s}")
        super().check_backbone(backbone, config)

    def patch_at(self, row: int, col: int) -> torch.Tensor:
        """(1, 3, S, S): zeros with the patch at rows row..row+p-1, columns col..col+p-1."""
        s, p = self.image_size, self.prompt_size
        return F.pad(self.patch, (col, s - p - col, row, s - p - row))

    def pixel_prompt(self, batch: int) -> torch.Tensor:  # (1, 3, S, S)
        return self.patch_at(0, 0)


register(
    MethodSpec(
        name="fixed-patch",
        config_cls=FixedPatchConfig,
        module_cls=FixedPatchModule,
        trainer=Trainer.SGD,
        summary="a learned pixel patch at the image's top-left corner",
        smoke_config={"epochs": 2, "prompt_size": 4},
    )
)
