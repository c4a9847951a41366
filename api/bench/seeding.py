"""Seeding shared by the benchmarks and the tests: prompts as tuning would leave them
without tuning, ready tasks published through the store, and test images.

``random_module`` / ``random_prompt`` give each method's own initialisation plus noise:
serving cost does not depend on how well a prompt was tuned. ``seed_tasks`` publishes ready
tasks exactly as a tuning job does (``store.publish``).
"""

from __future__ import annotations

import io
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from backbone import Backbone, TrainedPrompt
    from backbone.methods.base import PromptModule
    from store.settings import Settings

def _registered() -> tuple[dict[str, dict[str, Any]], tuple[str, ...]]:
    from backbone.methods import get_method, method_names

    # one config per method, so all its tasks share their prompt length; a method not named
    # here is benched with its defaults, so a new method joins the benches with its own file
    overrides: dict[str, dict[str, Any]] = {
        "zeroshot": {"templates": "single"}, "coop": {"n_ctx": 16}, "vpt-shallow": {"n_tokens": 10},
        "vpt-deep": {"n_tokens": 10},
    }  # fmt: skip
    configs = {m: dict(overrides.get(m, {})) for m in method_names()}
    return configs, tuple(m for m in method_names() if get_method(m).module_cls.needs_text)


#: Configs of the published prompts, every registered method (see ``_registered``).
SERVE_CONFIGS, TEXT_METHODS = _registered()


# --------------------------------------------------------------------------- prompts


def random_module(
    backbone: "Backbone", method: str, classes: list[str], config: dict | None = None, *, seed: int = 0,
    scale: float = 0.05,
) -> "PromptModule":
    """A module as tuning would leave it, without tuning: the method's own initialisation
    (seeded) plus N(0, scale^2) noise on every learned tensor, so that tasks really differ.
    For benchmarks and tests of serving; the caller's RNG state is left untouched."""
    import torch

    from backbone.methods import get_method, parse_config
    from backbone.tuning import build_module

    spec = get_method(method)
    cfg = parse_config(method, {**(config or {}), "seed": seed})
    devices = [backbone.device] if backbone.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        module = build_module(backbone, spec, classes, cfg)
        with torch.no_grad():
            for p in module.parameters():
                p.add_(scale * torch.randn_like(p))
    return module


def random_prompt(
    backbone: "Backbone", method: str, classes: list[str], config: dict | None = None, *, seed: int = 0,
    scale: float = 0.05,
) -> "TrainedPrompt":
    """``random_module`` as a saveable prompt."""
    from backbone.methods import get_method
    from backbone.tuning import prompt_of

    return prompt_of(backbone, get_method(method).name, random_module(backbone, method, classes, config, seed=seed, scale=scale))


# --------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class SeededTask:
    task_id: str
    method: str
    tenant: int  # index into the tenants' keys
    headers: dict[str, str]


def seed_tasks(
    settings: "Settings",
    bb: "Backbone",
    *,
    n_tasks: int,
    n_tenants: int,
    methods: list[str],
    n_classes: int = 4,
    seed: int = 0,
) -> list[SeededTask]:
    """Create ``n_tenants`` tenants and ``n_tasks`` ready tasks (methods round-robin, tenants
    round-robin) whose first version is published through ``store.publish`` exactly as a
    tuning job publishes it. Each method's prompt is built once (``random_prompt``); every
    task gets its own class names and its own noise on the learned tensors."""
    import torch

    from backbone import TrainedPrompt
    from store import repo
    from store.db import session_scope
    from store.publish import publish_prompt
    from store.db import get_sessionmaker
    from store.objects import get_object_store

    sm = get_sessionmaker(settings.database_url)
    objects = get_object_store(settings)
    keys = []
    run = secrets.token_hex(3)
    with session_scope(sm) as s:
        for i in range(n_tenants):
            tenant, key = repo.create_tenant(s, f"bench-{run}-tenant-{i}")
            keys.append((tenant.id, key))
    base: dict[str, TrainedPrompt] = {}
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in range(n_tasks):
        method = methods[t % len(methods)]
        tenant_i = t % n_tenants
        tenant_id, key = keys[tenant_i]
        classes = [f"object {seed + t} {c}" for c in range(n_classes)]
        if method not in base:
            base[method] = random_prompt(bb, method, classes, SERVE_CONFIGS.get(method, {}), seed=seed)
        b = base[method]
        tensors = {
            k: (v + 0.05 * torch.randn(v.shape, generator=gen, dtype=v.dtype) if v.is_floating_point() else v).contiguous()
            for k, v in b.tensors.items()
        }
        prompt = TrainedPrompt(b.method, b.config, classes, b.fingerprint, tensors)
        with session_scope(sm) as s:
            task = repo.create_task(
                s, tenant_id=tenant_id, name=f"bench task {t}", method=method, config=prompt.config, classes=classes
            )
            task_id = task.id
        with session_scope(sm) as s:
            repo.claim_run(s, task_id, 1)
        data = prompt.to_bytes(extra={"version": "1", "task_id": task_id, "attempt": "1"})
        pv = publish_prompt(
            sm, objects, task_id=task_id, attempt=1, data=data, fingerprint=bb.fingerprint, classes=classes, metrics={}
        )
        if pv is None:
            raise RuntimeError(f"could not publish bench task {task_id}")
        out.append(SeededTask(task_id, method, tenant_i, {"Authorization": f"Bearer {key}"}))
    return out


# --------------------------------------------------------------------------- images


def make_images(size: int, n: int = 8, seed: int = 0) -> list[bytes]:
    """``n`` distinct JPEG images of ``size`` px (noise over a colour, like photos compress)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        base = rng.integers(0, 256, size=3)
        arr = np.clip(base + rng.normal(0, 40, size=(size, size, 3)), 0, 255).astype("uint8")
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out
