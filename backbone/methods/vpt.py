"""Visual Prompt Tuning, shared by vpt-shallow and vpt-deep (Jia et al., "Visual
Prompt Tuning", ECCV 2022).

Prompts enter after the embedding step as [CLS, prompts, patches] without positional
embedding. Shallow: one set at the input of layer 0. Deep: a set per layer; before
every layer after the first, positions 1..N are replaced by that layer's prompts.
Init uniform(-v, v), v = sqrt(6 / (3 * patch_h * patch_w + D)). The backbone stays
in eval mode; only prompt dropout is active while training.

On CLIP backbones "the embedding step" includes ``ln_pre`` (CLIP's pre-transformer
norm), so prompts enter right before the first block, the same place deep prompts
are written before later blocks.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from ..towers import ImageFeatures, TokenPrompts
from .base import (
    PLAIN, HeadPromptModule, ImagePass, MethodConfig, TrainConfig, build_head, resolve_head, underscores_to_spaces,
)

if TYPE_CHECKING:
    from ..loading import Backbone


class VPTConfig(TrainConfig):
    """With the clip head, class names become text as in CLIP's prompts here: '_' becomes a
    space ('dog_house' -> 'dog house'), hyphens and case are kept, and the name fills the
    template's '{}'. That prompt must fit the text encoder's context (77 tokens for CLIP, start
    and end included) and no two classes may make the same tokens (the tokenizer ignores case
    and extra whitespace): such a task is refused, never cut. The linear head reads no text."""

    n_tokens: int = Field(10, ge=0, le=200, description="Prompt tokens per layer (0 gives the plain forward).")
    prompt_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the prompts while training.")
    head: Literal["linear", "clip"] = Field(
        "linear",
        description="linear: a Linear on the final-normed [CLS] feature (the paper); clip: the CLIP text "
        "classifier ('a photo of a {}.') on the projected [CLS] feature (open_clip backbones only).",
    )
    template: str = Field(
        "a photo of a {}.",
        description="Class-name template of the clip head; the name fills '{}' with '_' read as a space, and "
        "the filled template must fit the text encoder's context (77 tokens).",
    )
    epochs: int | None = Field(None, ge=1, le=10_000, description="Training epochs. None: 100 (the paper, FGVC).")
    lr: float = Field(
        0.25,
        gt=0.0,
        le=1e4,
        description="Peak lr. The paper searches a base lr scaled by batch/256; 0.25 is a mid-grid value for "
        "the linear head (use ~0.01 with the clip head, whose logits are scaled by 100).",
    )
    weight_decay: float = Field(1e-4, ge=0.0, le=1.0, description="Weight decay (the paper searches 1e-4..1e-2).")
    warmup: Literal["constant", "linear"] = Field("linear", description="Linear warm-up (the paper).")

    default_warmup_epochs: ClassVar[int] = 10

    def default_epochs(self, shots: int) -> int:
        return 100


class VPTModule(HeadPromptModule):
    is_deep: ClassVar[bool] = False
    prepare_class_name = staticmethod(underscores_to_spaces)

    def __init__(self, backbone: "Backbone", classes: list[str], config: VPTConfig):
        super().__init__(backbone, classes, config)
        vis = backbone.vision
        ph, pw = vis.patch_size
        v = math.sqrt(6.0 / float(3 * ph * pw + vis.width))  # 0.0625 for ViT-B/16
        layers = vis.depth if self.is_deep else 1
        self.prompts = nn.Parameter(torch.empty(layers, config.n_tokens, vis.width))  # (layers, N, D)
        nn.init.uniform_(self.prompts, -v, v)
        self.prompt_dropout = nn.Dropout(config.prompt_dropout)
        self.head_kind = resolve_head(backbone, config.head)
        self.classifier = build_head(backbone, classes, self.head_kind, config.template, self.prepare_class_name)

    @classmethod
    def check_backbone(cls, backbone: "Backbone", config: VPTConfig) -> None:
        super().check_backbone(backbone, config)
        resolve_head(backbone, config.head)

    @property
    def n_tokens(self) -> int:
        return int(self.prompts.shape[1])

    @property
    def deep(self) -> bool:
        return self.is_deep and self.prompts.shape[0] > 1

    def image_pass(self) -> ImagePass:
        if self.n_tokens == 0:
            return PLAIN
        return ImagePass("tokens", n_tokens=self.n_tokens, deep=self.deep)

    def layer_prompts(self) -> torch.Tensor:  # (layers, N, D), one dropout mask while training
        return self.prompt_dropout(self.prompts)

    def token_prompts(self, batch: int) -> TokenPrompts | None:
        if self.n_tokens == 0:
            return None
        # expand first, then dropout: every image draws its own mask, as VPT's reference code
        # does (``prompt_dropout(prompts.expand(B, -1, -1))``); identity (and views) in eval
        p = self.prompt_dropout(self.prompts.unsqueeze(0).expand(batch, -1, -1, -1))  # (B, layers, N, D)
        first = p[:, 0]  # (B, N, D)
        deep = p[:, 1:] if self.deep else None  # (B, depth-1, N, D)
        return TokenPrompts(first=first, deep=deep)

    def head(self, feats: ImageFeatures) -> torch.Tensor:  # -> (B, C)
        return self.classifier(feats)
