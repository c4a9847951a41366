"""coop: learned context vectors in the CLIP text prompt (Zhou et al., "Learning to
Prompt for Vision-Language Models", IJCV 2022).

The prompt "X X ... X {class}." is tokenised and embedded; its embedding is split
into prefix (SOT), n_ctx context slots and suffix (class tokens, ".", EOT, padding).
The context slots are learned; the class token sits at the end, in the middle or at
the front. The EOT position is the same in all three arrangements.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ..errors import ConfigError
from ..towers import ImageFeatures
from .base import MethodConfig, PromptModule, TrainConfig, clip_logits, underscores_to_spaces
from .registry import MethodSpec, Trainer, register

if TYPE_CHECKING:
    from ..loading import Backbone, TextTokens

DEFAULT_N_CTX = 16


class CoOpConfig(TrainConfig):
    """Class names become text as CoOp's reference code does it: only '_' becomes a space
    ('dog_house' -> 'dog house'; 'T-shirt' stays 'T-shirt'), in the prompt 'X X ... X {name}.'
    with n_ctx context slots. That prompt must fit the text encoder's context (77 tokens for
    CLIP, start and end included) and no two classes may make the same tokens (the tokenizer
    ignores case and extra whitespace): such a task is refused, never cut."""

    n_ctx: int | None = Field(
        None,
        ge=1,
        le=64,
        description="Number of context vectors. None: 16 (the paper's default) with random init, or the "
        "token count of 'init'. When given together with 'init' it must equal that token count. "
        "The class name follows with only '_' read as a space (hyphens kept, as in the authors' code); "
        "n_ctx + the class name's tokens + 3 (the '.', start and end) must fit the text encoder's 77.",
    )
    init: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="Initialise the context from the word embeddings of this phrase (e.g. 'a photo of a'). "
        "None: N(0, init_std^2) (the paper's default).",
    )
    init_std: float = Field(0.02, gt=0.0, le=1.0, description="Std of the random context initialisation.")
    class_token_position: Literal["end", "middle", "front"] = Field(
        "end", description="Where the class name goes relative to the context."
    )
    class_specific: bool = Field(
        False, description="One context per class (CSC) instead of one shared by all classes."
    )

    @model_validator(mode="after")
    def _check_init(self) -> "CoOpConfig":
        if self.init is not None and not self.init.strip():
            raise ValueError("init must contain words, e.g. 'a photo of a'")
        return self

    def default_epochs(self, shots: int) -> int:
        # the paper's schedule by shots per class: 1 -> 50, 2/4 -> 100, 8/16 -> 200
        if shots <= 1:
            return 50
        if shots <= 4:
            return 100
        return 200


def context_prompt(n_ctx: int, name: str) -> str:
    """CoOp's prompt text of one (prepared) class name: n_ctx placeholder words, the name, '.'."""
    return " ".join(["X"] * n_ctx) + " " + name + "."


def resolved_n_ctx(config: MethodConfig, tokens: "TextTokens") -> int:
    """The number of context slots ``_init_context`` gives (the init phrase's token count, else
    n_ctx or 16), from the tokenizer alone. ConfigError, as ``_init_context`` raises it, when
    both are given and disagree (so the API refuses it before a job would)."""
    init = getattr(config, "init", None)
    if init:
        n = max(0, tokens.count([init.replace("_", " ").strip()])[0] - 2)
        n_ctx = getattr(config, "n_ctx", None)
        if n_ctx is not None and n_ctx != n:
            raise ConfigError(f"n_ctx={n_ctx} does not match init {init!r}, which is {n} tokens; omit n_ctx or make them agree")
        return n
    return getattr(config, "n_ctx", None) or DEFAULT_N_CTX


def context_text_prompts(
    module_cls: type[PromptModule], classes: list[str], config: MethodConfig, tokens: "TextTokens | None"
) -> list[list[str]] | None:
    """CoOp's and CoCoOp's one prompt per class (no text tower: none)."""
    if tokens is None:
        return None
    n_ctx = resolved_n_ctx(config, tokens)
    return [[context_prompt(n_ctx, module_cls.prepare_class_name(c))] for c in classes]


class CoOpModule(PromptModule):
    cache_features = True
    needs_text = True
    prepare_class_name = staticmethod(underscores_to_spaces)
    text_prompt_hint = ", or use fewer context vectors (n_ctx, or a shorter init)"

    @classmethod
    def text_prompts(
        cls, classes: list[str], config: MethodConfig, tokens: "TextTokens | None"
    ) -> list[list[str]] | None:
        return context_text_prompts(cls, classes, config, tokens)

    def __init__(self, backbone: "Backbone", classes: list[str], config: CoOpConfig):
        super().__init__(backbone, classes, config)
        text = backbone.require_text("coop")
        class_specific = bool(getattr(config, "class_specific", False))
        n_ctx, ctx_init = self._init_context(backbone, config, len(classes) if class_specific else None)
        self.n_ctx = n_ctx
        names = [self.prepare_class_name(c) for c in classes]
        self.name_lens = [backbone_token_count(backbone, n) for n in names]
        prompts = [context_prompt(n_ctx, name) for name in names]
        tokens = backbone.tokenize(prompts)  # (C, L)
        with torch.no_grad():
            emb = text.embed_tokens(tokens)  # (C, L, Dt)
        # derived from the backbone: not saved (persistent=False)
        self.register_buffer("prefix", emb[:, :1].clone(), persistent=False)  # (C, 1, Dt)  SOT
        self.register_buffer("suffix", emb[:, 1 + n_ctx:].clone(), persistent=False)  # (C, L-1-n_ctx, Dt)
        self.register_buffer("eot", tokens.argmax(dim=-1), persistent=False)  # (C,)
        self.ctx = nn.Parameter(ctx_init.float())  # (n_ctx, Dt) or (C, n_ctx, Dt)
        self.register_buffer("text_feats", None, persistent=False)  # filled by prepare_serving

    @staticmethod
    def _init_context(
        backbone: "Backbone", config: CoOpConfig, n_classes: int | None = None
    ) -> tuple[int, torch.Tensor]:
        """(n_ctx, initial context): (n_ctx, Dt) unified, or (n_classes, n_ctx, Dt) class-specific.

        Random init draws every class's context independently (CoOp's CSC); a phrase init
        gives every class the phrase's embeddings."""
        text = backbone.require_text("coop")
        if config.init:
            phrase = config.init.replace("_", " ").strip()
            n = backbone_token_count(backbone, phrase)
            if config.n_ctx is not None and config.n_ctx != n:
                raise ConfigError(
                    f"n_ctx={config.n_ctx} does not match init {config.init!r}, which is {n} tokens; "
                    "omit n_ctx or make them agree"
                )
            tokens = backbone.tokenize([phrase])  # (1, L)
            with torch.no_grad():
                ctx = text.embed_tokens(tokens)[0, 1:1 + n].clone()  # (n_ctx, Dt)
            if n_classes is not None:
                ctx = ctx.unsqueeze(0).expand(n_classes, -1, -1).clone()  # (C, n_ctx, Dt)
            return n, ctx
        n = config.n_ctx or DEFAULT_N_CTX
        shape = (n, text.width) if n_classes is None else (n_classes, n, text.width)
        ctx = torch.empty(shape, device=backbone.device)
        nn.init.normal_(ctx, std=config.init_std)
        return n, ctx

    def prompt_embeddings(self, ctx: torch.Tensor | None = None) -> torch.Tensor:
        """Embedded prompts of all classes, (C, L, Dt). ``ctx`` (n_ctx, Dt) or (C, n_ctx, Dt)."""
        ctx = self.ctx if ctx is None else ctx
        n_cls = self.prefix.shape[0]
        ctx = ctx.to(self.prefix.dtype)
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(n_cls, -1, -1)  # (C, n_ctx, Dt)
        position = getattr(self.config, "class_token_position", "end")
        if position == "end":
            return torch.cat([self.prefix, ctx, self.suffix], dim=1)
        half = self.n_ctx // 2
        rows = []
        for i in range(n_cls):
            n = self.name_lens[i]
            cls_tok = self.suffix[i:i + 1, :n]  # (1, n, Dt)
            rest = self.suffix[i:i + 1, n:]  # ".", EOT, padding
            if position == "middle":
                parts = [self.prefix[i:i + 1], ctx[i:i + 1, :half], cls_tok, ctx[i:i + 1, half:], rest]
            else:  # front
                parts = [self.prefix[i:i + 1], cls_tok, ctx[i:i + 1], rest]
            rows.append(torch.cat(parts, dim=1))
        return torch.cat(rows, dim=0)

    def text_features(self) -> torch.Tensor:  # -> (C, E)
        if self.text_feats is not None:
            return self.text_feats
        return self.bb.text.encode_embedded(self.prompt_embeddings(), self.eot)

    def head(self, feats: ImageFeatures) -> torch.Tensor:  # -> (B, C)
        return clip_logits(self.bb.logit_scale, feats.embeds, self.text_features())

    @torch.no_grad()
    def prepare_serving(self) -> None:
        self.text_feats = self.text_features().float()  # (C, E)
        self.prefix = self.suffix = None  # only needed to rebuild the text features


def backbone_token_count(backbone: "Backbone", text: str) -> int:
    """BPE tokens of ``text`` between SOT and EOT (the tokenizer's own count)."""
    tokens = backbone.tokenize([text])  # (1, L)
    return int(tokens.argmax(dim=-1).item()) - 1


register(
    MethodSpec(
        name="coop",
        config_cls=CoOpConfig,
        module_cls=CoOpModule,
        trainer=Trainer.SGD,
        summary="learned context vectors around the class name in the CLIP text prompt",
        smoke_config={"epochs": 2, "n_ctx": 2},
    )
)
