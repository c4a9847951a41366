"""Token-level access to the frozen towers.

The prompt methods need to reach inside the towers: VPT inserts tokens into the
image token sequence, CoOp/CoCoOp feed learned embeddings into the text
transformer. These adapters run the library's own modules (open_clip's
``_embeds``/``resblocks``/``_pool``, timm's ``patch_embed``/``_pos_embed``/
``blocks``/``pool``) in the same order as the library's forward, so with no
prompts the result equals ``encode_image`` / ``encode_text`` exactly (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import BackboneError


@dataclass
class ImageFeatures:
    """What the image tower gives the heads.

    pooled: (B, W) the final-normed pooled token (the [CLS] feature a linear head reads).
    embeds: (B, E) the image embedding (``encode_image`` output: pooled @ proj for CLIP;
            equal to ``pooled`` for timm models, which have no projection).
    """

    pooled: torch.Tensor | None  # (B, W)
    embeds: torch.Tensor  # (B, E)


@dataclass
class TokenPrompts:
    """Per-image VPT prompts for one forward of the image tower.

    first: (B, N, D) the prompts inserted after the prefix tokens at the input of layer 0.
    deep:  (Bd, depth - 1, N, D) replacement prompts for layers 1..depth-1 of the images
           listed in ``deep_index``; None when every image is shallow.
    deep_index: (Bd,) long, rows of the batch that are deep; None means all rows.
    """

    first: torch.Tensor  # (B, N, D)
    deep: torch.Tensor | None = None  # (Bd, depth - 1, N, D)
    deep_index: torch.Tensor | None = None  # (Bd,)

    @property
    def n_tokens(self) -> int:
        return int(self.first.shape[1])


class VisionAdapter:
    """Common interface of the open_clip and timm ViT image towers."""

    library: str
    n_prefix: int  # tokens before the patches ([CLS], registers)
    width: int  # token dim D
    depth: int  # number of transformer blocks
    patch_size: tuple[int, int]
    pooled_dim: int  # W
    embed_dim: int  # E
    blocks: list[nn.Module]

    def embed(self, images: torch.Tensor) -> torch.Tensor:  # (B,3,S,S) -> (B, n_prefix + P, D)
        raise NotImplementedError

    def finish(self, x: torch.Tensor) -> ImageFeatures:  # (B, n_prefix + P, D) -> features
        raise NotImplementedError

    def forward(self, images: torch.Tensor, prompts: TokenPrompts | None = None) -> ImageFeatures:
        """Image tower forward with optional VPT prompts.

        images: (B, 3, S, S) preprocessed, on the tower's device and dtype.
        Prompts are placed after the prefix tokens: [CLS, prompts, patches]. Deep images
        get positions n_prefix..n_prefix+N replaced before every block after the first.
        The prompt tokens are dropped again before the final norm and pooling.
        """
        x = self.embed(images)  # (B, T, D)
        n = 0 if prompts is None else prompts.n_tokens
        p = self.n_prefix
        if n:
            first = prompts.first.to(x.dtype)  # (B, N, D)
            x = torch.cat([x[:, :p], first, x[:, p:]], dim=1)  # (B, T + N, D)
        for i, blk in enumerate(self.blocks):
            if i > 0 and n and prompts.deep is not None:
                deep_i = prompts.deep[:, i - 1].to(x.dtype)  # (Bd, N, D)
                if prompts.deep_index is None:
                    mid = deep_i
                else:
                    mid = x[:, p:p + n].index_copy(0, prompts.deep_index, deep_i)  # (B, N, D)
                x = torch.cat([x[:, :p], mid, x[:, p + n:]], dim=1)
            x = blk(x)
        if n:
            x = torch.cat([x[:, :p], x[:, p + n:]], dim=1)  # drop prompts before norm/pool
        return self.finish(x)


class OpenClipVision(VisionAdapter):
    library = "open_clip"

    def __init__(self, visual: nn.Module):
        from open_clip.transformer import VisionTransformer

        if not isinstance(visual, VisionTransformer):
            raise BackboneError(
                f"open_clip image tower {type(visual).__name__} is not supported; "
                "use a ViT architecture (e.g. ViT-B-32, ViT-B-16, tiny)"
            )
        self.visual = visual
        self.n_prefix = 1
        self.width = int(visual.conv1.out_channels)
        self.blocks = list(visual.transformer.resblocks)
        self.depth = len(self.blocks)
        self.patch_size = tuple(visual.patch_size)
        if not getattr(visual.transformer, "batch_first", True):
            raise BackboneError("open_clip image transformer must run batch-first (N, L, D)")
        self.pooled_dim = int(visual.ln_post.normalized_shape[0])
        self.embed_dim = int(visual.proj.shape[1]) if visual.proj is not None else self.pooled_dim

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual._embeds(images)  # conv1 -> [CLS] + pos -> patch_dropout -> ln_pre

    def finish(self, x: torch.Tensor) -> ImageFeatures:
        pooled, _ = self.visual._pool(x)  # ln_post + pooling as the library does it
        embeds = pooled @ self.visual.proj if self.visual.proj is not None else pooled
        return ImageFeatures(pooled=pooled, embeds=embeds)


class TimmVision(VisionAdapter):
    library = "timm"

    def __init__(self, model: nn.Module):
        from timm.models.vision_transformer import VisionTransformer

        if not isinstance(model, VisionTransformer):
            raise BackboneError(
                f"timm model {type(model).__name__} is not supported; use a timm ViT "
                "(VisionTransformer, e.g. vit_base_patch16_224)"
            )
        self.model = model
        self.n_prefix = int(model.num_prefix_tokens)
        self.width = int(model.embed_dim)
        self.blocks = list(model.blocks)
        self.depth = len(self.blocks)
        self.patch_size = tuple(model.patch_embed.patch_size)
        self.pooled_dim = self.width
        self.embed_dim = self.width

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.patch_embed(images)
        x = m._pos_embed(x)  # prefix tokens + pos embed + pos dropout
        x = m.patch_drop(x)
        return m.norm_pre(x)

    def finish(self, x: torch.Tensor) -> ImageFeatures:
        m = self.model
        x = m.norm(x)
        pooled = m.fc_norm(m.pool(x))  # (B, W)
        return ImageFeatures(pooled=pooled, embeds=pooled)


class TextAdapter:
    """The CLIP text transformer, fed with token ids or with embeddings."""

    def __init__(self, model: nn.Module):
        from open_clip.model import CLIP, CustomTextCLIP
        from open_clip.transformer import TextTransformer

        if isinstance(model, CLIP):
            src = model
            pool_type = model.text_pool_type
            cls_emb = None
        elif isinstance(model, CustomTextCLIP) and isinstance(model.text, TextTransformer):
            src = model.text
            pool_type = src.pool_type
            cls_emb = src.cls_emb
        else:
            raise BackboneError(f"text tower of {type(model).__name__} is not supported")
        if pool_type != "argmax" or cls_emb is not None or getattr(src, "attn_mask", None) is None:
            raise BackboneError(
                "text tower must be a causal CLIP text transformer pooled at the EOT token (argmax)"
            )
        self.token_embedding: nn.Embedding = src.token_embedding
        self.positional_embedding: torch.Tensor = src.positional_embedding
        self.transformer: nn.Module = src.transformer
        self.ln_final: nn.Module = src.ln_final
        self.text_projection = src.text_projection
        self.attn_mask: torch.Tensor = src.attn_mask
        self.context_length = int(self.positional_embedding.shape[0])
        self.width = int(self.token_embedding.embedding_dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.get_cast_dtype()

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:  # (T, L) -> (T, L, Dt)
        return self.token_embedding(tokens).to(self.dtype)

    def encode_embedded(self, x: torch.Tensor, eot: torch.Tensor, truncate: bool = True) -> torch.Tensor:
        """Text features from token embeddings.

        x: (T, L, Dt) token embeddings (learned context already spliced in).
        eot: (T,) long, the EOT position of each sequence (argmax of the token ids).
        truncate: cut the sequence after the last EOT of the batch. The mask is causal, so
            positions after a sequence's EOT never reach its EOT feature: same result up to
            float rounding, far fewer tokens. ``truncate=False`` is ``encode_text`` exactly.
        Returns (T, E).
        """
        dtype = self.dtype
        length = int(eot.max().item()) + 1 if truncate else x.shape[1]
        x = x[:, :length].to(dtype) + self.positional_embedding[:length].to(dtype)
        x = self.transformer(x, attn_mask=self.attn_mask[:length, :length])
        x = self.ln_final(x)  # (T, L', Dt)
        x = x[torch.arange(x.shape[0], device=x.device), eot]  # (T, Dt)
        if self.text_projection is None:
            return x
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(x)
        return x @ self.text_projection  # (T, E)

    def encode(self, tokens: torch.Tensor, truncate: bool = True) -> torch.Tensor:  # (T, L) -> (T, E)
        return self.encode_embedded(self.embed_tokens(tokens), tokens.argmax(dim=-1), truncate=truncate)

