"""Serving many tenants on one backbone: resident prompts and the mixed-batch forward.

``forward_mixed`` classifies a batch whose images belong to different tasks. It knows
no method: it routes rows by each module's declared ``image_pass()`` (``ImagePass``) and
applies heads through each module class's ``batched_heads`` hook.
  1. every "plain" or "pixels" image goes through ONE image-tower pass; "pixels" images
     get their own task's additive pixel prompt (``pixel_prompt``) added first;
  2. "tokens" images are grouped by prompt length N; each group is ONE pass with every
     image's prompts gathered into its token sequence (shallow and deep mixed: deep
     rows get their layer prompts written before each later block);
  3. tasks are grouped by their class's ``batched_heads`` hook, and each group's rows go
     through one call of it (CoCoOp batches all its images' text passes there).
Each image's logits equal a forward of its task alone (``ResidentPrompt.forward``).

The prompt's backbone fingerprint is checked once, where its bytes are loaded
(``artifacts.load_prompt``); a ``TrainedPrompt`` in memory is trusted.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Sequence

import torch

from .artifacts import TrainedPrompt
from .errors import PromptFormatError, PromptMismatch
from .methods import get_method, parse_config
from .methods.base import ImagePass, PromptModule
from .towers import ImageFeatures, TokenPrompts
from .tuning import build_module

if TYPE_CHECKING:
    from .loading import Backbone


class ResidentPrompt:
    """A TrainedPrompt prepared on the backbone's device, derived tensors included."""

    def __init__(self, backbone: "Backbone", prompt: TrainedPrompt, module: PromptModule):
        self.backbone = backbone
        self.prompt = prompt
        self.module = module
        self.method = prompt.method
        self.classes = list(prompt.classes)
        self.image_pass: ImagePass = module.image_pass()
        self.n_tokens = self.image_pass.n_tokens
        self.deep = self.image_pass.deep
        self.frame = self.first = self.deep_prompts = None
        if self.image_pass.kind == "pixels":
            frame = module.pixel_prompt(1)
            if frame is None or frame.shape[0] != 1:
                raise PromptFormatError(f"method {self.method} served no single (1, 3, S, S) pixel prompt")
            self.frame = frame.detach().to(backbone.dtype)  # (1, 3, S, S)
        elif self.image_pass.kind == "tokens":
            tp = module.token_prompts(1)
            if tp is None or tp.n_tokens != self.n_tokens or (tp.deep is not None) != self.deep:
                raise PromptFormatError(f"method {self.method}'s token prompts do not match its image pass")
            self.first = tp.first[0].detach().to(backbone.dtype)  # (N, D)
            self.deep_prompts = tp.deep[0].detach().to(backbone.dtype) if self.deep else None  # (depth-1, N, D)
        derived = [t for t in (self.frame, self.first, self.deep_prompts) if t is not None]
        self.nbytes = _storage_bytes([*module.resident_tensors(), *derived])  # device bytes held by this task

    def __repr__(self) -> str:
        return f"ResidentPrompt({self.method}, {len(self.classes)} classes, {self.nbytes} B)"

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """This task alone: images (B, 3, S, S) -> logits (B, C) float32 on CPU."""
        return self.module(images=images).float().cpu()


def prepare_resident(backbone: "Backbone", prompt: TrainedPrompt) -> ResidentPrompt:
    """Build the method's module from the prompt's config and tensors on ``backbone``. The prompt's
    fingerprint was checked where it was loaded (``load_prompt``)."""
    spec = get_method(prompt.method)
    cfg = parse_config(prompt.method, prompt.config)
    with torch.random.fork_rng(devices=[backbone.device] if backbone.device.type == "cuda" else []):
        module = build_module(backbone, spec, prompt.classes, cfg, check_text=False)  # checked when tuned
    try:
        module.load_state_dict({k: v.to(backbone.device) for k, v in prompt.tensors.items()}, strict=True)
    except RuntimeError as exc:
        raise PromptFormatError(f"prompt tensors do not fit method {prompt.method}: {exc}") from None
    return resident_from_module(backbone, prompt, module)


def resident_from_module(backbone: "Backbone", prompt: TrainedPrompt, module: PromptModule) -> ResidentPrompt:
    """Serve ``module`` (already holding ``prompt``'s tensors, e.g. just tuned) without rebuilding it.
    The module is frozen and stripped for serving in place."""
    if module.bb is not backbone:
        raise PromptMismatch(f"the {prompt.method} module was built on another backbone object than {backbone.fingerprint}")
    module.eval()
    module.requires_grad_(False)
    module.prepare_serving()
    return ResidentPrompt(backbone, prompt, module)


@torch.no_grad()
def forward_mixed(
    backbone: "Backbone",
    residents: Sequence[ResidentPrompt],
    images: torch.Tensor,
    owner: torch.Tensor,
) -> list[torch.Tensor]:
    """Classify a mixed batch.

    images (B, 3, S, S) preprocessed; owner (B,) long, image i belongs to residents[owner[i]].
    Returns B tensors, logits (n_classes of its task,) float32 on CPU.
    """
    b = images.shape[0]
    if owner.shape != (b,):
        raise ValueError(f"owner must be ({b},), got {tuple(owner.shape)}")
    if b == 0:
        return []
    owners = owner.tolist()
    if min(owners) < 0 or max(owners) >= len(residents):
        raise ValueError(f"owner indices must lie in [0, {len(residents)})")
    for r in set(owners):
        if residents[r].backbone is not backbone:
            raise PromptMismatch(f"resident {r} ({residents[r].method}) was prepared on another backbone")
    dev, dtype = backbone.device, backbone.dtype
    images = images.to(dev, dtype)

    # ---- 1/2: route rows to image-tower passes by their declared image pass
    plain: list[int] = []
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, r in enumerate(owners):
        n = residents[r].image_pass.n_tokens
        (by_len[n] if n else plain).append(i)

    pooled = embeds = None
    def _store(rows: list[int], f: ImageFeatures) -> None:
        nonlocal pooled, embeds
        if embeds is None:
            embeds = f.embeds.new_empty(b, f.embeds.shape[1])  # (B, E)
            pooled = f.pooled.new_empty(b, f.pooled.shape[1])  # (B, W)
        idx = torch.tensor(rows, device=dev)
        embeds[idx] = f.embeds
        pooled[idx] = f.pooled

    if plain:
        x = images[torch.tensor(plain, device=dev)]  # (Bp, 3, S, S)
        framed = [(j, owners[i]) for j, i in enumerate(plain) if residents[owners[i]].frame is not None]
        if framed:
            slots, frames = _gather([r for _, r in framed], lambda r: residents[r].frame[0])  # (F, 3, S, S)
            rows = torch.tensor([j for j, _ in framed], device=dev)
            x = x.index_add(0, rows, frames[slots])
        _store(plain, backbone.vision.forward(x))

    for n, rows in sorted(by_len.items()):
        rs = [owners[i] for i in rows]
        slots, firsts = _gather(rs, lambda r: residents[r].first)  # firsts (R, N, D)
        first = firsts[slots]  # (Bn, N, D)
        deep_rows = [j for j, r in enumerate(rs) if residents[r].deep]
        deep = deep_index = None
        if deep_rows:
            dslots, deeps = _gather([rs[j] for j in deep_rows], lambda r: residents[r].deep_prompts)
            deep = deeps[dslots]  # (Bd, depth-1, N, D)
            deep_index = None if len(deep_rows) == len(rows) else torch.tensor(deep_rows, device=dev)
        x = images[torch.tensor(rows, device=dev)]
        _store(rows, backbone.vision.forward(x, TokenPrompts(first=first, deep=deep, deep_index=deep_index)))

    # ---- 3: heads per task, on each task's rows (one index transfer, one result transfer)
    rows_of: dict[int, list[int]] = defaultdict(list)
    for i, r in enumerate(owners):
        rows_of[r].append(i)
    tasks = list(rows_of)
    perm = torch.tensor([i for r in tasks for i in rows_of[r]], device=dev)  # (B,) rows grouped by task
    embeds, pooled = embeds[perm], pooled[perm]  # (B, E), (B, W) in task order
    logits: dict[int, torch.Tensor] = {}  # task -> (b_r, C_r) on device
    by_hook: dict[object, list[tuple[int, ImageFeatures]]] = defaultdict(list)
    start = 0
    for r in tasks:
        n = len(rows_of[r])
        feats = ImageFeatures(pooled=pooled[start:start + n], embeds=embeds[start:start + n])
        start += n
        by_hook[_head_hook(residents[r].module)].append((r, feats))
    for group in by_hook.values():
        module_cls = type(residents[group[0][0]].module)
        out_group = module_cls.batched_heads(backbone, [(residents[r].module, f) for r, f in group])
        for (r, _), lg in zip(group, out_group):
            logits[r] = lg
    flat = torch.cat([logits[r].float().reshape(-1) for r in tasks]).cpu()
    out: list[torch.Tensor | None] = [None] * b
    start = 0
    for r in tasks:
        n_cls = len(residents[r].classes)
        block = flat[start:start + len(rows_of[r]) * n_cls].view(-1, n_cls)  # (b_r, C_r)
        start += block.numel()
        for j, i in enumerate(rows_of[r]):
            out[i] = block[j]
    return out  # type: ignore[return-value]


def _head_hook(module: PromptModule) -> object:
    """The function behind a module class's ``batched_heads`` (classes sharing it share one call)."""
    hook = type(module).batched_heads
    return getattr(hook, "__func__", hook)


def _storage_bytes(tensors: Sequence[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and aliases counted once)."""
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[(str(t.device), st.data_ptr())] = st.nbytes()
    return sum(seen.values())


def _gather(keys: list[int], get) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack one tensor per distinct key; return (slot of each key (K,), stack (R, ...))."""
    order: dict[int, int] = {}
    for k in keys:
        order.setdefault(k, len(order))
    stack = torch.stack([get(k) for k in order])
    slots = torch.tensor([order[k] for k in keys], device=stack.device)
    return slots, stack
