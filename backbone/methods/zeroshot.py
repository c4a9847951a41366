"""zeroshot: CLIP's hand-crafted prompts, nothing learned (Radford et al., CLIP)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field, field_validator

from ..towers import ImageFeatures
from .base import MethodConfig, PromptModule, class_text_features, clip_logits, template_prompts, underscores_to_spaces
from .registry import MethodSpec, Trainer, register

if TYPE_CHECKING:
    from ..loading import Backbone, TextTokens

SINGLE_TEMPLATE = "a photo of a {}."


def _openclip_templates(name: str) -> list[str]:
    from open_clip import zero_shot_metadata as z

    return [t("{}") for t in getattr(z, name)]


class ZeroshotConfig(MethodConfig):
    """Class names become text as CLIP's prompts here: '_' becomes a space ('dog_house' ->
    'dog house'), hyphens and case are kept; each template gets the name in its '{}'. Every
    class's prompt must fit the text encoder's context (77 tokens for CLIP, start and end
    included) and no two classes may make the same tokens (the tokenizer ignores case and extra
    whitespace): such a task is refused, never cut."""

    templates: Literal["single", "ensemble", "imagenet80"] = Field(
        "single",
        description="single: 'a photo of a {}.'; ensemble: CLIP's 7 recommended ImageNet templates; "
        "imagenet80: CLIP's 80 ImageNet templates. Ensembles average normalised text features. "
        "The class name fills '{}' with '_' read as a space; every prompt must fit the text encoder's "
        "context (77 tokens), or the task is refused.",
    )
    custom_templates: list[str] | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="Your own templates, each containing '{}' once for the class name ('_' read as a space); "
        "overrides 'templates'. Each filled template must fit the text encoder's context (77 tokens).",
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
    cache_features = True
    needs_text = True
    prepare_class_name = staticmethod(underscores_to_spaces)
    text_prompt_hint = " or the template"

    @classmethod
    def text_prompts(
        cls, classes: list[str], config: ZeroshotConfig, tokens: "TextTokens | None"
    ) -> list[list[str]] | None:
        if tokens is None:
            return None
        return template_prompts(classes, config.template_list(), cls.prepare_class_name)

    def __init__(self, backbone: "Backbone", classes: list[str], config: ZeroshotConfig):
        super().__init__(backbone, classes, config)
        # derived from the backbone and the config, so never saved: (C, E)
        self.register_buffer(
            "text_feats",
            class_text_features(backbone, classes, config.template_list(), self.prepare_class_name),
            persistent=False,
        )

    def head(self, feats: ImageFeatures) -> torch.Tensor:  # -> (B, C)
        return clip_logits(self.bb.logit_scale, feats.embeds, self.text_feats)


register(
    MethodSpec(
        name="zeroshot",
        config_cls=ZeroshotConfig,
        module_cls=ZeroshotModule,
        trainer=Trainer.NONE,
        summary="hand-crafted templates through the CLIP text encoder",
        smoke_config={},
        needs_dataset=False,
    )
)
