"""zeroshot: CLIP's hand-crafted prompts, nothing learned (Radford et al., CLIP)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field, field_validator

from ..towers import ImageFeatures
from .base import MethodConfig, PromptModule, class_text_features, clip_logits
from .registry import MethodSpec, register

if TYPE_CHECKING:
    from ..loading import Backbone

SINGLE_TEMPLATE = "a photo of a {}."


def _openclip_templates(name: str) -> list[str]:
    from open_clip import zero_shot_metadata as z

    return [t("{}") for t in getattr(z, name)]


class ZeroshotConfig(MethodConfig):
    templates: Literal["single", "ensemble", "imagenet80"] = Field(
        "single",
        description="single: 'a photo of a {}.'; ensemble: CLIP's 7 recommended ImageNet templates; "
        "imagenet80: CLIP's 80 ImageNet templates. Ensembles average normalised text features.",
    )
    custom_templates: list[str] | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="Your own templates, each containing '{}' once for the class name; overrides 'templates'.",
    )

    @field_validator("custom_templates")
    @classmethod
    def _one_slot(cls, v: list[str] | None) -> list[str] | None:
        for t in v or []:
            if t.count("{}") != 1:
                raise ValueError(f"template {t!r} must contain '{{}}' exactly once")
        return v

    def template_list(self) -> list[str]:
        if self.custom_templates:
            return list(self.custom_templates)
        if self.templates == "single":
            return [SINGLE_TEMPLATE]
        if self.templates == "ensemble":
            return _openclip_templates("SIMPLE_IMAGENET_TEMPLATES")
        return _openclip_templates("OPENAI_IMAGENET_TEMPLATES")


class ZeroshotModule(PromptModule):
    image_path = "features"
    needs_text = True

    def __init__(self, backbone: "Backbone", classes: list[str], config: ZeroshotConfig):
        super().__init__(backbone, classes, config)
        # derived from the backbone and the config, so never saved: (C, E)
        self.register_buffer(
            "text_feats", class_text_features(backbone, classes, config.template_list()), persistent=False
        )

    def head(self, feats: ImageFeatures) -> torch.Tensor:  # -> (B, C)
        return clip_logits(self.bb.logit_scale, feats.embeds, self.text_feats)


register(
    MethodSpec(
        name="zeroshot",
        config_cls=ZeroshotConfig,
        module_cls=ZeroshotModule,
        trainer="none",
        summary="hand-crafted templates through the CLIP text encoder",
    )
)
