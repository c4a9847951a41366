"""cocoop: CoOp context plus an image-conditioned shift from a meta-net (Zhou et al.,
"Conditional Prompt Learning for Vision-Language Models", CVPR 2022).

Meta-net: Linear(E, E // 16) - ReLU - Linear(E // 16, Dt), fed with the L2-normalised
image feature; its output is added to every context vector, so each image has its
own prompts and its own text features for all classes. Class token at the end.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..towers import ImageFeatures
from .base import MethodConfig, PromptModule, TrainConfig, underscores_to_spaces
from .coop import CoOpModule, context_prompt, context_text_prompts
from .registry import MethodSpec, Trainer, register

if TYPE_CHECKING:
    from ..loading import Backbone, TextTokens


class CoCoOpConfig(TrainConfig):
    """Class names become text as CoCoOp's reference code does it: only '_' becomes a space
    ('dog_house' -> 'dog house'; 'T-shirt' stays 'T-shirt'), in the prompt 'X X ... X {name}.'
    with n_ctx context slots. That prompt must fit the text encoder's context (77 tokens for
    CLIP, start and end included) and no two classes may make the same tokens (the tokenizer
    ignores case and extra whitespace): such a task is refused, never cut."""

    n_ctx: int | None = Field(
        None,
        ge=1,
        le=64,
        description="Number of context vectors. None: the token count of 'init' (4 for 'a photo of a'), "
        "or 16 with random init. The class name follows with only '_' read as a space (hyphens kept, as "
        "in the authors' code); n_ctx + the class name's tokens + 3 (the '.', start and end) must fit the "
        "text encoder's 77.",
    )
    init: str | None = Field(
        "a photo of a",
        min_length=1,
        max_length=200,
        description="Context initialisation phrase (the paper: 'a photo of a'); None: N(0, init_std^2).",
    )
    init_std: float = Field(0.02, gt=0.0, le=1.0, description="Std of the random context initialisation.")
    batch_size: int = Field(1, ge=1, le=4096, description="Images per step (the paper: 1).")
    epochs: int | None = Field(None, ge=1, le=10_000, description="Training epochs. None: 10 (the paper).")

    def default_epochs(self, shots: int) -> int:
        return 10


class CoCoOpModule(PromptModule):
    cache_features = True
    needs_text = True
    prepare_class_name = staticmethod(underscores_to_spaces)
    text_prompt_hint = ", or use fewer context vectors (n_ctx, or a shorter init)"

    @classmethod
    def text_prompts(
        cls, classes: list[str], config: MethodConfig, tokens: "TextTokens | None"
    ) -> list[list[str]] | None:
        return context_text_prompts(cls, classes, config, tokens)

    def __init__(self, backbone: "Backbone", classes: list[str], config: CoCoOpConfig):
        super().__init__(backbone, classes, config)
        text = backbone.require_text("cocoop")
        n_ctx, ctx_init = CoOpModule._init_context(backbone, config)
        self.n_ctx = n_ctx
        names = [self.prepare_class_name(c) for c in classes]
        tokens = backbone.tokenize([context_prompt(n_ctx, name) for name in names])  # (C, L)
        with torch.no_grad():
            emb = text.embed_tokens(tokens)  # (C, L, Dt)
        self.register_buffer("prefix", emb[:, :1].clone(), persistent=False)  # (C, 1, Dt)
        self.register_buffer("suffix", emb[:, 1 + n_ctx:].clone(), persistent=False)  # (C, L-1-n_ctx, Dt)
        self.register_buffer("eot", tokens.argmax(dim=-1), persistent=False)  # (C,)
        self.ctx = nn.Parameter(ctx_init.float())  # (n_ctx, Dt)
        vis_dim = backbone.vision.embed_dim
        hidden = max(1, vis_dim // 16)
        self.meta_net = nn.Sequential(
            OrderedDict(
                [
                    ("linear1", nn.Linear(vis_dim, hidden)),
                    ("relu", nn.ReLU(inplace=True)),
                    ("linear2", nn.Linear(hidden, text.width)),
                ]
            )
        ).to(backbone.device)

    def text_inputs(self, image_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image prompts for all classes.

        image_embeds (B, E) -> (embeddings (B*C, L, Dt), eot (B*C,)), image-major.
        """
        imf = F.normalize(image_embeds.float(), dim=-1)  # (B, E)
        shift = self.meta_net(imf)  # (B, Dt)
        ctx = (self.ctx.unsqueeze(0) + shift.unsqueeze(1)).to(self.prefix.dtype)  # (B, n_ctx, Dt)
        b, n_cls = ctx.shape[0], self.prefix.shape[0]
        x = torch.cat(
            [
                self.prefix.unsqueeze(0).expand(b, -1, -1, -1),  # (B, C, 1, Dt)
                ctx.unsqueeze(1).expand(-1, n_cls, -1, -1),  # (B, C, n_ctx, Dt)
                self.suffix.unsqueeze(0).expand(b, -1, -1, -1),  # (B, C, L-1-n_ctx, Dt)
            ],
            dim=2,
        )
        return x.reshape(b * n_cls, x.shape[2], x.shape[3]), self.eot.repeat(b)

    def logits_from_text(self, image_embeds: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
        """image_embeds (B, E), text_feats (B*C, E) image-major -> logits (B, C) float32."""
        b = image_embeds.shape[0]
        img = F.normalize(image_embeds.float(), dim=-1)  # (B, E)
        txt = F.normalize(text_feats.float(), dim=-1).reshape(b, -1, img.shape[-1])  # (B, C, E)
        return self.bb.logit_scale * torch.einsum("be,bce->bc", img, txt)

    def head(self, feats: ImageFeatures) -> torch.Tensor:  # -> (B, C)
        x, eot = self.text_inputs(feats.embeds)
        return self.logits_from_text(feats.embeds, self.bb.text.encode_embedded(x, eot))

    @classmethod
    def batched_heads(
        cls, backbone: "Backbone", groups: Sequence[tuple[PromptModule, ImageFeatures]]
    ) -> list[torch.Tensor]:
        """Every image's per-class prompts of every CoCoOp task in ONE text-tower call."""
        modules: list[CoCoOpModule] = [m for m, _ in groups]  # type: ignore[misc]
        embeds = [f.embeds for _, f in groups]
        inputs = [m.text_inputs(e) for m, e in zip(modules, embeds)]  # [(b_r*C_r, L_r, Dt), (b_r*C_r,)]
        length = max(x.shape[1] for x, _ in inputs)  # zero-pad after every EOT to one length
        x_all = torch.cat([F.pad(x, (0, 0, 0, length - x.shape[1])) for x, _ in inputs])  # (T, L, Dt)
        text = backbone.text.encode_embedded(x_all, torch.cat([e for _, e in inputs]))
        out, start = [], 0
        for m, e, (x, _) in zip(modules, embeds, inputs):
            out.append(m.logits_from_text(e, text[start:start + x.shape[0]]))  # (b_r, C_r)
            start += x.shape[0]
        return out

    @torch.no_grad()
    def prepare_serving(self) -> None:
        # keep the suffix only up to the last EOT: under the causal mask the padding after it
        # never reaches an EOT feature (text features unchanged, ~1/8 of the bytes at 77 tokens)
        keep = int(self.eot.max().item()) + 1 - (1 + self.n_ctx)
        self.suffix = self.suffix[:, :keep].clone()  # (C, keep, Dt)


register(
    MethodSpec(
        name="cocoop",
        config_cls=CoCoOpConfig,
        module_cls=CoCoOpModule,
        trainer=Trainer.SGD,
        summary="CoOp context shifted per image by a small meta-net",
        smoke_config={"epochs": 1, "batch_size": 4},
    )
)
