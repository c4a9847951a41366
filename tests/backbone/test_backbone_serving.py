"""The mixed-tenant batched forward equals per-task forwards."""

from __future__ import annotations

import pytest
import torch

from api.bench.seeding import random_module, random_prompt
from backbone import PromptMismatch, forward_mixed
from backbone.serving import prepare_resident, resident_from_module
from backbone.tuning import prompt_of

# 12 tasks, all 7 methods; VPT with lengths 0, 3 (shallow and deep: one group), 5
TASKS = [
    ("zeroshot", {"templates": "ensemble"}, 3),
    ("coop", {"n_ctx": 4}, 4),
    ("coop", {"init": "a photo of a", "class_token_position": "middle", "class_specific": True}, 2),
    ("cocoop", {}, 3),
    ("cocoop", {"n_ctx": 2, "init": None}, 5),
    ("vpt-shallow", {"n_tokens": 3}, 2),
    ("vpt-deep", {"n_tokens": 3, "head": "clip"}, 3),
    ("vpt-deep", {"n_tokens": 5, "prompt_dropout": 0.1}, 4),  # dropout: training only
    ("vpt-shallow", {"n_tokens": 0}, 2),
    ("padding", {}, 3),
    ("padding", {"pad": 6, "head": "linear"}, 2),
    ("linear-probe", {}, 3),
]


def _resident(bb, method, config, n_classes, seed):
    classes = [f"thing_{seed}_{i}" for i in range(n_classes)]
    # init plus noise on every learned tensor, so that tasks really differ
    return prepare_resident(bb, random_prompt(bb, method, classes, config, seed=seed))


@pytest.fixture(scope="module")
def residents(tiny):
    return [_resident(tiny, m, c, n, seed) for seed, (m, c, n) in enumerate(TASKS)]


def test_mixed_forward_equals_per_task_forward(tiny, residents):
    g = torch.Generator().manual_seed(0)
    b = 40
    images = torch.randn(b, 3, 32, 32, generator=g)
    owner = torch.cat([torch.arange(len(residents)), torch.randint(0, len(residents), (b - len(residents),), generator=g)])
    owner = owner[torch.randperm(b, generator=g)]
    assert len({residents[i].method for i in owner.tolist()}) == 7 and len(set(owner.tolist())) == 12
    mixed = forward_mixed(tiny, residents, images, owner)
    assert len(mixed) == b
    worst = 0.0
    for r, res in enumerate(residents):
        rows = (owner == r).nonzero(as_tuple=True)[0]
        alone = res.forward(images[rows])  # the task alone, all its images
        for j, i in enumerate(rows.tolist()):
            assert mixed[i].shape == (len(res.classes),) and mixed[i].dtype == torch.float32
            assert mixed[i].device.type == "cpu"
            worst = max(worst, (mixed[i] - alone[j]).abs().max().item())
            single = res.forward(images[i:i + 1])[0]  # and one image alone
            worst = max(worst, (mixed[i] - single).abs().max().item())
    assert worst < 1e-5, worst


def test_mixed_forward_runs_one_pass_per_prompt_length(tiny, residents, monkeypatch):
    calls = []
    real = tiny.vision.forward

    def counting(images, prompts=None):
        calls.append((images.shape[0], 0 if prompts is None else prompts.n_tokens))
        return real(images, prompts)

    monkeypatch.setattr(tiny.vision, "forward", counting)
    owner = torch.arange(len(residents)).repeat(2)
    forward_mixed(tiny, residents, torch.randn(len(owner), 3, 32, 32), owner)
    # untouched + padding + VPT(0) share one pass; VPT 3 (shallow + deep) one; VPT 5 one
    assert sorted(n for _, n in calls) == [0, 3, 5]
    assert sum(bs for bs, _ in calls) == len(owner)


def test_resident_bytes(tiny, residents):
    for res in residents:
        assert res.nbytes > 0
    coop = residents[1]
    # after prepare, CoOp holds its context and class text features, not the token embeddings
    assert coop.module.prefix is None and coop.module.text_feats is not None
    assert coop.nbytes < 4 * 1024 + 4 * len(coop.classes) * tiny.vision.embed_dim + 4096
    # fp32 VPT serves views of its own prompts: counted once, exactly the stored tensors
    vpt = residents[5]
    assert vpt.method == "vpt-shallow" and vpt.nbytes == vpt.prompt.nbytes
    # padding also keeps its assembled frame (1, 3, S, S) and its class text features
    pad = residents[9]
    assert pad.method == "padding"
    assert pad.nbytes == pad.prompt.nbytes + 3 * 32 * 32 * 4 + 4 * len(pad.classes) * tiny.vision.embed_dim


def test_owner_validation(tiny, residents):
    images = torch.randn(3, 3, 32, 32)
    with pytest.raises(ValueError, match="owner must be"):
        forward_mixed(tiny, residents, images, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="owner indices"):
        forward_mixed(tiny, residents, images, torch.tensor([0, 1, 99]))
    assert forward_mixed(tiny, residents, images[:0], torch.tensor([], dtype=torch.long)) == []


def test_residents_of_another_backbone_are_refused(tiny, tiny_other):
    other = _resident(tiny_other, "coop", {"n_ctx": 2}, 2, 0)
    with pytest.raises(PromptMismatch):
        forward_mixed(tiny, [other], torch.randn(1, 3, 32, 32), torch.tensor([0]))


@pytest.mark.parametrize("method", ["coop", "padding", "vpt-deep"])
def test_resident_from_module_serves_like_a_loaded_prompt(tiny, tiny_other, method):
    module = random_module(tiny, method, ["a", "b", "c"], {}, seed=3)
    prompt = prompt_of(tiny, method, module)
    loaded = prepare_resident(tiny, prompt)
    direct = resident_from_module(tiny, prompt, module)  # no rebuild, no state-dict round trip
    assert direct.nbytes == loaded.nbytes
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    assert torch.equal(direct.forward(x), loaded.forward(x))
    with pytest.raises(PromptMismatch):
        resident_from_module(tiny_other, prompt, random_module(tiny, method, ["a", "b", "c"], {}, seed=3))


def test_cocoop_serving_keeps_the_suffix_up_to_the_last_eot(tiny):
    module = random_module(tiny, "cocoop", ["sea_lion", "a much longer class name here", "cat"], {}, seed=5)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        before = module(images=x)
    full = module.suffix.shape[1]
    res = resident_from_module(tiny, prompt_of(tiny, "cocoop", module), module)
    assert module.suffix.shape[1] == int(module.eot.max()) + 1 - (1 + module.n_ctx) < full
    assert torch.equal(res.forward(x), before)
