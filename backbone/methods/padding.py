"""padding: a learned pixel frame added around the image (Bahng et al., "Exploring
Visual Prompts for Adapting Large-Scale Models", 2022).

Parameters pad_up/pad_down (1, 3, p, S) and pad_left/pad_right (1, 3, S-2p, p), init
randn; the frame [up; [left, 0, right]; down] is added to the preprocessed, normalised
image. Output through the CLIP text classifier ("This is a photo of a {}", the paper)
or, for backbones without a text tower, a linear head on the pooled feature.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from ..errors import ConfigError
from ..towers import ImageFeatures
from .base import (
    PIXELS, HeadPromptModule, ImagePass, MethodConfig, TrainConfig, build_head,
    lower_underscores_hyphens_to_spaces, resolve_head,
)
from .registry import MethodSpec, Trainer, register

if TYPE_CHECKING:
    from ..loading import Backbone

PAPER_PAD, PAPER_SIZE = 30, 224


def scaled_prompt_size(image_size: int, paper: int = PAPER_PAD) -> int:
    """The paper's prompt size at 224 px, scaled to ``image_size`` (at least 1)."""
    return max(1, round(paper * image_size / PAPER_SIZE))


def pixel_head_field() -> Any:
    return Field("auto", description="auto: clip with a text tower (the paper), else linear; clip; linear.")


def pixel_template_field() -> Any:
    return Field(
        "This is a photo of a {}",
        description="Class-name template of the clip head (the paper's); the name fills '{}' lowercased, with "
        "'_' and '-' read as spaces, and the filled template must fit the text encoder's context (77 tokens).",
    )


class PixelPromptConfig(TrainConfig):
    """Training defaults of Bahng et al.'s pixel prompts (padding, fixed-patch, random-patch).
    With the clip head, class names become text as the authors' reference code does it
    (``refine_classname``): lowercased, and both '_' and '-' become spaces ('T-shirt_top' ->
    't shirt top'); the name fills the template's '{}'. That prompt must fit the text encoder's
    context (77 tokens for CLIP, start and end included) and no two classes may make the same
    tokens ('t-shirt' and 't shirt' do): such a task is refused, never cut. The linear head
    reads no text. Subclasses add their size field, then ``head`` and ``template``."""

    epochs: int | None = Field(
        None,
        ge=1,
        le=10_000,
        description="Training epochs. None: 50. The paper runs 1,000 epochs on full training sets; few-shot "
        "sets converge far sooner.",
    )
    lr: float = Field(40.0, gt=0.0, le=1e4, description="Peak lr (the paper: SGD, lr 40).")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="Weight decay (the paper: 0).")
    warmup: Literal["constant", "linear"] = Field("linear", description="Linear warm-up (the paper).")

    default_warmup_epochs: ClassVar[int] = 5

    def default_epochs(self, shots: int) -> int:
        return 50


class PaddingConfig(PixelPromptConfig):
    __doc__ = PixelPromptConfig.__doc__

    pad: int | None = Field(
        None,
        ge=1,
        le=512,
        description="Frame width in pixels. None: 30 at 224 px (the paper), scaled to the backbone's image size.",
    )
    head: Literal["auto", "clip", "linear"] = pixel_head_field()
    template: str = pixel_template_field()

    def pad_for(self, image_size: int) -> int:
        return self.pad if self.pad is not None else scaled_prompt_size(image_size)


class PixelPromptModule(HeadPromptModule):
    """A "pixels" pass with the padding paper's head: subclasses create their parameters, then
    call ``_build_head``, and return their prompt from ``pixel_prompt``."""

    prepare_class_name = staticmethod(lower_underscores_hyphens_to_spaces)

    @classmethod
    def check_backbone(cls, backbone: "Backbone", config: MethodConfig) -> None:
        super().check_backbone(backbone, config)
        resolve_head(backbone, config.head)  # type: ignore[attr-defined]

    def _build_head(self, backbone: "Backbone", classes: list[str], config: MethodConfig) -> None:
        self.head_kind = resolve_head(backbone, config.head)  # type: ignore[attr-defined]
        self.classifier = build_head(
            backbone, classes, self.head_kind, config.template, self.prepare_class_name  # type: ignore[attr-defined]
        )

    def image_pass(self) -> ImagePass:
        return PIXELS

    def head(self, feats: ImageFeatures) -> torch.Tensor:  # -> (B, C)
        return self.classifier(feats)


class PaddingModule(PixelPromptModule):
    def __init__(self, backbone: "Backbone", classes: list[str], config: PaddingConfig):
        super().__init__(backbone, classes, config)
        s = backbone.image_size
        p = config.pad_for(s)
        self.pad = p
        self.pad_up = nn.Parameter(torch.randn(1, 3, p, s))
        self.pad_down = nn.Parameter(torch.randn(1, 3, p, s))
        self.pad_left = nn.Parameter(torch.randn(1, 3, s - 2 * p, p))
        self.pad_right = nn.Parameter(torch.randn(1, 3, s - 2 * p, p))
        self._build_head(backbone, classes, config)

    @classmethod
    def check_backbone(cls, backbone: "Backbone", config: PaddingConfig) -> None:
        p = config.pad_for(backbone.image_size)
        if 2 * p >= backbone.image_size:
            raise ConfigError(
                f"pad={p} leaves no image: 2 * pad must be smaller than the image size {backbone.image_size}"
            )
        super().check_backbone(backbone, config)

    def pixel_frame(self) -> torch.Tensor:  # (1, 3, S, S)
        s, p = self.pad_up.shape[-1], self.pad
        base = torch.zeros(1, 3, s - 2 * p, s - 2 * p, device=self.pad_up.device, dtype=self.pad_up.dtype)
        middle = torch.cat([self.pad_left, base, self.pad_right], dim=3)
        return torch.cat([self.pad_up, middle, self.pad_down], dim=2)

    def pixel_prompt(self, batch: int) -> torch.Tensor:  # (1, 3, S, S)
        return self.pixel_frame()


register(
    MethodSpec(
        name="padding",
        config_cls=PaddingConfig,
        module_cls=PaddingModule,
        trainer=Trainer.SGD,
        summary="a learned pixel frame around the image",
        smoke_config={"epochs": 2, "pad": 4},
    )
)
