"""What every prompt method is made of: a config and a module.

A method is a pydantic config (each field documented, unknown keys and invalid
combinations rejected at construction) plus a ``PromptModule``: an nn.Module
holding only the learned tensors, which reads the frozen backbone but never owns
it (the backbone is not a child module, so ``module.parameters()`` are the prompt
parameters and nothing else).

How a module's images pass the image tower is its ``image_pass()`` (an ``ImagePass``):
  - plain: the tower is untouched (zeroshot, coop, cocoop, linear-probe, VPT with 0 tokens);
  - pixels: the module's additive pixel prompt (``pixel_prompt``) is added to the
    preprocessed image first (padding, fixed-patch, random-patch);
  - tokens: N prompt tokens enter the image token sequence (``token_prompts``), at layer 0
    or before every layer (deep) (vpt-shallow, vpt-deep).
The mixed forward (``serving.forward_mixed``) groups rows by that value alone, and applies
heads to a group of tasks through the class hook ``batched_heads`` (CoCoOp batches every
image's text pass there). Methods whose head reads only the untouched tower's embeddings
declare ``cache_features`` so that tuning computes them once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal, Sequence

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from ..errors import BackboneError, ConfigError
from ..towers import ImageFeatures, TokenPrompts

if TYPE_CHECKING:
    from ..loading import Backbone, TextTokens


# ---------------------------------------------------------------- class names -> text


def underscores_to_spaces(name: str) -> str:
    """'dog_house' -> 'dog house'; hyphens and case are kept ('T-shirt' stays). CoOp's and
    CoCoOp's reference code (``name.replace("_", " ")``); also zeroshot and the VPT clip head."""
    return name.replace("_", " ")


def lower_underscores_hyphens_to_spaces(name: str) -> str:
    """'T-Shirt_top' -> 't shirt top': lowercased, '_' and '-' become spaces. The padding
    authors' reference code (Bahng et al., ``refine_classname``)."""
    return name.lower().replace("_", " ").replace("-", " ")


#: how each rule reads in error messages
NAME_RULE_TEXT: dict[Callable[[str], str], str] = {
    underscores_to_spaces: "'_' becomes a space",
    lower_underscores_hyphens_to_spaces: "'_' and '-' become spaces",
}


class MethodConfig(BaseModel):
    """Fields every method accepts. Numbers must be finite (NaN and infinities are refused)
    and every float field declares both bounds (``registry.float_bounds``)."""

    # strict: a value of the wrong JSON type ("3" for an int, 1 for a bool, 2.0 for an int) is
    # refused with the key named, never coerced; an int is still a valid float
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=True)

    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed of the train/validation split, the initialisation and the batch order.")
    val_fraction: float = Field(
        0.2,
        ge=0.0,
        le=0.9,
        description="Fraction of each class held out for validation (rounded per class; at least one image "
        "per class always stays in training). 0 disables validation.",
    )

    def schedule_epochs(self, shots: int) -> int:  # overridden by trained methods
        return 0


def search_field() -> Any:
    """The ``search`` flag of the trained methods' configs (``backbone.search``)."""
    return Field(
        False,
        description="true: tune this method over the hyperparameters its paper sweeps on validation (starting "
        "from this config) and publish the best on the validation split: the search of method auto, restricted "
        "to this method. false: train this config once.",
    )


class TrainConfig(MethodConfig):
    """Fields of the gradient-trained methods (SGD/AdamW, warm-up then cosine)."""

    epochs: int | None = Field(
        None, ge=1, le=10_000, description="Training epochs. None: the method's default schedule (see method)."
    )
    batch_size: int = Field(32, ge=1, le=4096, description="Images per optimisation step.")
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="sgd (with momentum, the papers' choice) or adamw.")
    lr: float = Field(0.002, gt=0.0, le=1e4, description="Peak learning rate, reached after warm-up.")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum (ignored by adamw).")
    weight_decay: float = Field(5e-4, ge=0.0, le=1.0, description="Weight decay on the prompt parameters.")
    warmup_epochs: int | None = Field(
        None,
        ge=0,
        description="Warm-up epochs before the cosine decay. None: the method's paper value, capped at "
        "epochs // 10 so that short runs are not all warm-up.",
    )
    warmup: Literal["constant", "linear"] = Field(
        "constant", description="constant: lr = warmup_lr during warm-up (CoOp); linear: ramp 0 -> lr (VPT)."
    )
    warmup_lr: float = Field(
        1e-5, gt=0.0, le=1e4, description="Learning rate of a constant warm-up (0 < warmup_lr <= 1e4, like lr)."
    )
    search: bool = search_field()

    default_warmup_epochs: ClassVar[int] = 1

    @model_validator(mode="after")
    def _check_schedule(self) -> "TrainConfig":
        if self.epochs is not None and self.warmup_epochs is not None and self.warmup_epochs >= self.epochs:
            raise ValueError(
                f"warmup_epochs ({self.warmup_epochs}) must be smaller than epochs ({self.epochs})"
            )
        return self

    def schedule_epochs(self, shots: int) -> int:
        return self.epochs if self.epochs is not None else self.default_epochs(shots)

    def default_epochs(self, shots: int) -> int:
        return 50

    def schedule_warmup(self, epochs: int) -> int:
        if self.warmup_epochs is not None:
            return min(self.warmup_epochs, epochs - 1)
        return min(self.default_warmup_epochs, epochs // 10)


@dataclass(frozen=True)
class ImagePass:
    """How a module's images pass the image tower; the key the mixed forward groups rows by.

    kind: "plain" (untouched tower), "pixels" (an additive pixel prompt first) or "tokens"
    (``n_tokens`` >= 1 prompt tokens per layer; ``deep``: new ones before every layer)."""

    kind: Literal["plain", "pixels", "tokens"] = "plain"
    n_tokens: int = 0
    deep: bool = False

    def __post_init__(self) -> None:
        if (self.kind == "tokens") != (self.n_tokens > 0) or (self.deep and self.kind != "tokens"):
            raise ValueError(f"inconsistent image pass {self}: tokens passes and only they have n_tokens >= 1")


PLAIN = ImagePass("plain")
PIXELS = ImagePass("pixels")


class PromptModule(nn.Module):
    """Learned tensors of one task; reads, never owns, the frozen backbone."""

    #: the head reads only ``feats.embeds`` of the untouched tower: tuning may compute them once
    cache_features: ClassVar[bool] = False
    needs_text: ClassVar[bool] = False

    def __init__(self, backbone: "Backbone", classes: list[str], config: MethodConfig):
        super().__init__()
        self.bb = backbone  # plain object, not an nn.Module: never registered as a child
        self.classes = list(classes)
        self.config = config

    #: how a class name becomes text in this method's prompts (one rule function, named in the
    #: config's description)
    prepare_class_name: ClassVar[Callable[[str], str]] = staticmethod(underscores_to_spaces)
    #: what else a tenant can shorten when a prompt is over the text encoder's context
    text_prompt_hint: ClassVar[str] = ""

    @classmethod
    def text_prompts(
        cls, classes: list[str], config: MethodConfig, tokens: "TextTokens | None"
    ) -> list[list[str]] | None:
        """Every text prompt this method builds for each class (class order), exactly as the
        module tokenizes it; None when it builds none (no text head). ``tokens`` is None on a
        backbone without a text tower. Checked by ``check_text_prompts`` before any module is built."""
        return None

    @classmethod
    def check_texts(
        cls, method: str, classes: list[str], config: MethodConfig, tokens: "TextTokens | None"
    ) -> None:
        """ConfigError when this method's text prompts for ``classes`` would not fit the text encoder
        or two classes would read alike (``check_text_prompts``); what ``check_class_texts`` runs."""
        check_text_prompts(method, cls, classes, config, tokens)

    # -- compatibility with a backbone (called before building)

    @classmethod
    def check_backbone(cls, backbone: "Backbone", config: MethodConfig) -> None:
        if cls.needs_text and not backbone.has_text:
            raise ConfigError(
                f"method needs a CLIP text tower, which backbone {backbone.spec} ({backbone.library}) does not "
                "have; use an open_clip backbone, or an image-side method (one with a linear head: "
                "`promptstore methods` lists them)"
            )

    # -- image side

    def image_pass(self) -> ImagePass:
        """How this task's images pass the image tower (``ImagePass``)."""
        return PLAIN

    def pixel_prompt(self, batch: int) -> torch.Tensor | None:
        """A "pixels" pass's additive prompt for a batch of ``batch`` images: (1, 3, S, S), or
        (batch, 3, S, S) when rows differ; None for other passes. In eval mode it must be
        deterministic and (1, 3, S, S) (a served classifier)."""
        return None

    def token_prompts(self, batch: int) -> TokenPrompts | None:
        """A "tokens" pass's prompts for ``batch`` images; None for other passes."""
        return None

    def image_features(self, images: torch.Tensor) -> ImageFeatures:
        """images (B, 3, S, S) preprocessed -> features through this task's image path alone."""
        x = images.to(self.bb.device, self.bb.dtype)
        prompt = self.pixel_prompt(x.shape[0])
        if prompt is not None:
            x = x + prompt.to(x.dtype)
        return self.bb.encode_images(x, self.token_prompts(x.shape[0]))

    # -- head

    def head(self, feats: ImageFeatures) -> torch.Tensor:  # -> (B, C) float32
        raise NotImplementedError

    @classmethod
    def batched_heads(
        cls, backbone: "Backbone", groups: Sequence[tuple["PromptModule", ImageFeatures]]
    ) -> list[torch.Tensor]:
        """Logits (b_i, C_i) of several tasks' rows at once: each (module, its rows' features).
        The mixed forward hands every task whose class shares this hook to one call; the
        default runs each head alone. Override to batch work across tasks (CoCoOp)."""
        return [module.head(feats) for module, feats in groups]

    def forward(self, images: torch.Tensor | None = None, feats: ImageFeatures | None = None) -> torch.Tensor:
        """Logits (B, C) of this task alone, from images (B, 3, S, S) or from cached features."""
        if feats is None:
            if images is None:
                raise ValueError("forward needs images or features")
            feats = self.image_features(images)
        return self.head(feats)

    # -- serving

    @torch.no_grad()
    def prepare_serving(self) -> None:
        """Precompute derived tensors (class text features) and drop what only training needs."""

    def resident_tensors(self) -> list[torch.Tensor]:
        return [*self.parameters(), *(b for b in self.buffers() if b is not None)]


# ---------------------------------------------------------------- shared heads


def clip_logits(scale: torch.Tensor, image_embeds: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
    """scale * normalize(img) @ normalize(txt).T.  image_embeds (B, E), text_feats (C, E) -> (B, C) float32."""
    img = F.normalize(image_embeds.float(), dim=-1)
    txt = F.normalize(text_feats.float(), dim=-1)
    return scale * img @ txt.t()


TEXT_BATCH = 512  # text sequences per text-tower call when building classifiers


def template_prompts(
    classes: list[str], templates: list[str], prepare: Callable[[str], str] = underscores_to_spaces
) -> list[list[str]]:
    """Per class, ``template.format(prepare(name))`` for every template."""
    for t in templates:
        if t.count("{}") != 1:  # no slot: every class would read the same text
            raise ConfigError(f"template {t!r} must contain '{{}}' exactly once, where the class name goes")
    try:
        return [[t.format(prepare(c)) for t in templates] for c in classes]
    except (IndexError, KeyError, ValueError) as exc:
        bad = next((t for t in templates if t.count("{}") != 1), templates[0] if templates else "")
        raise ConfigError(
            f"template {bad!r} cannot take a class name ({type(exc).__name__}: {exc}); a template holds "
            "'{}' once where the name goes, and no other braces"
        ) from None


def class_text_features(
    backbone: "Backbone", classes: list[str], templates: list[str],
    prepare: Callable[[str], str] = underscores_to_spaces,
) -> torch.Tensor:
    """Zero-shot classifier: per template normalised text features, averaged over templates,
    normalised again (CLIP's ensemble; one template gives that template's normalised features).
    Class names are prepared by ``prepare`` ('_' -> space by default). Returns (C, E) float32."""
    text = backbone.require_text("a CLIP text classifier")
    prompts = [p for per_class in template_prompts(classes, templates, prepare) for p in per_class]  # C * K
    per_call = max(len(templates), TEXT_BATCH // len(templates) * len(templates))  # whole classes per call
    feats = []
    with torch.no_grad():
        for i in range(0, len(prompts), per_call):
            f = text.encode(backbone.tokenize(prompts[i:i + per_call])).float()  # (c * K, E)
            feats.append(F.normalize(f, dim=-1).reshape(-1, len(templates), f.shape[-1]).mean(dim=1))  # (c, E)
    return F.normalize(torch.cat(feats), dim=-1)  # (C, E)


class ClipTextHead(nn.Module):
    """Fixed CLIP text classifier from a template (derived from the backbone, never saved)."""

    def __init__(
        self, backbone: "Backbone", classes: list[str], templates: list[str],
        prepare: Callable[[str], str] = underscores_to_spaces,
    ):
        super().__init__()
        self.bb = backbone
        self.register_buffer(
            "text_feats", class_text_features(backbone, classes, templates, prepare), persistent=False
        )

    def forward(self, feats: ImageFeatures) -> torch.Tensor:  # -> (B, C)
        return clip_logits(self.bb.logit_scale, feats.embeds, self.text_feats)


class LinearHead(nn.Module):
    """VPT's head: one Linear on the final-normed pooled ([CLS]) feature, kaiming-normal
    (fan_out) weight, bias -log(99) (Jia et al., VPT; docs/methods.md)."""

    def __init__(self, dim: int, n_classes: int):
        super().__init__()
        self.fc = nn.Linear(dim, n_classes)
        nn.init.kaiming_normal_(self.fc.weight, a=0, mode="fan_out")
        nn.init.constant_(self.fc.bias, -math.log(99.0))

    def forward(self, feats: ImageFeatures) -> torch.Tensor:  # -> (B, C)
        if feats.pooled is None:
            raise BackboneError("linear head needs the pooled image feature")
        return self.fc(feats.pooled.float())


def resolve_head(backbone: "Backbone", head: str | None) -> str:
    """'auto'/None -> clip on a backbone with a text tower, linear otherwise."""
    if head in (None, "auto"):
        return "clip" if backbone.has_text else "linear"
    if head == "clip" and not backbone.has_text:
        raise ConfigError(
            f"head 'clip' needs a CLIP text tower, which backbone {backbone.spec} does not have; use head 'linear'"
        )
    return head


def build_head(
    backbone: "Backbone", classes: list[str], head: str, template: str,
    prepare: Callable[[str], str] = underscores_to_spaces,
) -> nn.Module:
    if head == "clip":
        return ClipTextHead(backbone, classes, [template], prepare)
    return LinearHead(backbone.vision.pooled_dim, len(classes))


def head_prompts(
    classes: list[str], head: str | None, template: str, tokens: "TextTokens | None",
    prepare: Callable[[str], str] = underscores_to_spaces,
) -> list[list[str]] | None:
    """The prompts of ``build_head``'s head as ``resolve_head`` picks it (no text tower: none)."""
    if tokens is None or head == "linear":
        return None
    return template_prompts(classes, [template], prepare)


class HeadPromptModule(PromptModule):
    """A module whose classifier is ``build_head(config.head, config.template)`` (VPT, the
    pixel prompts): its text prompts are that head's, with the method's name rule."""

    text_prompt_hint = " or the template"

    @classmethod
    def text_prompts(
        cls, classes: list[str], config: MethodConfig, tokens: "TextTokens | None"
    ) -> list[list[str]] | None:
        head, template = config.head, config.template  # type: ignore[attr-defined]
        return head_prompts(classes, head, template, tokens, cls.prepare_class_name)


# ---------------------------------------------------------------- text prompts that fit


def _quoted(text: str, limit: int = 120) -> str:
    return f"'{text}'" if len(text) <= limit else f"'{text[:limit]}...'"


def check_text_prompts(
    method: str, module_cls: type[PromptModule], classes: list[str], config: MethodConfig,
    tokens: "TextTokens | None",
) -> None:
    """Refuse (ConfigError) class prompts the text encoder cannot hold or cannot tell apart.

    Every prompt of every class is measured untruncated: one over the context length (start
    and end tokens included) names its class, its token count and the limit. Two or more
    classes whose prompts make the very same tokens (the tokenizer lowercases and drops extra
    whitespace; the method's name rule merges '_' and perhaps '-') are named together. No
    text prompts (no text head, or no text tower): nothing to check."""
    prompts = module_cls.text_prompts(list(classes), config, tokens)
    if not prompts or tokens is None:
        return
    limit = tokens.context_length
    flat = [p for per_class in prompts for p in per_class]
    ids = tokens.ids(flat)
    per_class: list[tuple[tuple[int, ...], ...]] = []
    too_long: list[str] = []
    i = 0
    for name, texts in zip(classes, prompts):
        mine = ids[i:i + len(texts)]
        i += len(texts)
        per_class.append(tuple(tuple(x) for x in mine))
        n = max(len(x) for x in mine)
        if n > limit:
            too_long.append(
                f"class {_quoted(name, 1000)} makes a text prompt of {n} tokens, over the text encoder's "
                f"limit of {limit}"
            )
    hint = module_cls.text_prompt_hint
    if too_long:
        more = f"; and {len(too_long) - 3} more classes" if len(too_long) > 3 else ""
        raise ConfigError(
            f"method {method}: " + "; ".join(too_long[:3]) + more + " (start and end tokens included); "
            f"the encoder would cut such a prompt and score only its beginning. Shorten the class name{hint}"
        )
    groups: dict[tuple[tuple[int, ...], ...], list[str]] = {}
    for name, key in zip(classes, per_class):
        groups.setdefault(key, []).append(name)
    ties = [(key, names) for key, names in groups.items() if len(names) > 1]
    if ties:
        rule = NAME_RULE_TEXT.get(module_cls.prepare_class_name, "")
        said = []
        for key, names in ties[:3]:
            shown = " and ".join(_quoted(n, 200) for n in names[:5]) + (
                f" (and {len(names) - 5} more)" if len(names) > 5 else ""
            )
            text = tokens.decode(list(key[0]))
            said.append(f"classes {shown} give the same text tokens" + (f" ({_quoted(text, 80)})" if text else ""))
        more = f"; and {len(ties) - 3} more such groups" if len(ties) > 3 else ""
        raise ConfigError(
            f"method {method}: " + "; ".join(said) + more + ", so the text encoder scores them exactly alike. "
            "The tokenizer ignores case and extra whitespace" + (f", and in this method {rule}" if rule else "")
            + "; rename the classes so that they differ in words"
        )

