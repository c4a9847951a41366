"""Numerics of the methods against the authors' reference code (docs/methods.md): CoOp prompt assembly, CoOp == zeroshot,
ensembles, CoCoOp's meta-net, VPT insertion and init, the padding frame, linear-probe."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from backbone import TrainedPrompt, forward_mixed, prepare_resident
from backbone.methods import get_method, parse_config
from backbone.methods.base import class_text_features
from backbone.methods.zeroshot import ZeroshotConfig
from backbone.tuning import build_module

NAMES = ["sea_lion", "aardvark", "red car"]


def _module(bb, method, config, classes=NAMES):
    return build_module(bb, get_method(method), classes, parse_config(method, config))


@pytest.mark.parametrize(
    "position, text",
    [("end", "a photo of a {}."), ("middle", "a photo {} of a."), ("front", "{} a photo of a.")],
)
def test_coop_prompt_assembly_equals_tokenised_text(tiny, position, text):
    m = _module(tiny, "coop", {"init": "a photo of a", "class_token_position": position})
    assert m.n_ctx == 4
    with torch.no_grad():
        ours = m.text_features()
        ref = tiny.model.encode_text(tiny.tokenize([text.format(n.replace("_", " ")) for n in NAMES]))
    assert (ours - ref).abs().max() < 1e-5


def test_coop_class_specific_context_shape_and_init(tiny):
    m = _module(tiny, "coop", {"init": "a photo of a", "class_specific": True})
    assert m.ctx.shape == (len(NAMES), 4, tiny.text.width)
    ref = _module(tiny, "coop", {"init": "a photo of a"})
    with torch.no_grad():
        assert (m.text_features() - ref.text_features()).abs().max() < 1e-6


def test_coop_class_specific_random_init_draws_each_class(tiny):
    """CoOp's CSC random init: torch.empty(n_cls, n_ctx, D) with N(0, 0.02), independent per class."""
    m = _module(tiny, "coop", {"class_specific": True, "n_ctx": 8, "seed": 0})
    assert m.ctx.shape == (len(NAMES), 8, tiny.text.width)
    for i in range(1, len(NAMES)):
        assert not torch.allclose(m.ctx[0], m.ctx[i])
    assert abs(m.ctx.std().item() - 0.02) < 0.005
    with torch.no_grad():
        emb = m.prompt_embeddings()  # (C, L, Dt): each class reads its own context
    assert torch.equal(emb[:, 1:9], m.ctx)


def test_coop_random_init_is_n_ctx_16_std_002(tiny):
    m = _module(tiny, "coop", {"seed": 0})
    assert m.ctx.shape == (16, tiny.text.width)
    assert abs(m.ctx.std().item() - 0.02) < 0.005


def test_coop_from_init_equals_zeroshot(tiny):
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    coop = _module(tiny, "coop", {"init": "a photo of a"})
    zs = _module(tiny, "zeroshot", {"templates": "single"})
    with torch.no_grad():
        assert (coop(images=x) - zs(images=x)).abs().max() < 1e-4  # logits are scaled by exp(logit_scale)
        assert (F.normalize(coop.text_features(), dim=-1) - zs.text_feats).abs().max() < 1e-6


def test_zeroshot_ensemble_averages_normalised_features(tiny):
    templates = ZeroshotConfig(templates="ensemble").template_list()
    assert len(templates) == 7 and all(t.count("{}") == 1 for t in templates)
    assert len(ZeroshotConfig(templates="imagenet80").template_list()) == 80
    feats = class_text_features(tiny, ["sea_lion"], templates)
    with torch.no_grad():
        per = F.normalize(tiny.model.encode_text(tiny.tokenize([t.format("sea lion") for t in templates])), dim=-1)
    ref = F.normalize(per.mean(0), dim=-1)
    assert (feats[0] - ref).abs().max() < 1e-5
    assert abs(feats.norm().item() - 1.0) < 1e-5


def test_cocoop_meta_net_shape_and_zero_shift_equals_coop(tiny):
    m = _module(tiny, "cocoop", {})
    e = tiny.vision.embed_dim
    assert m.n_ctx == 4  # "a photo of a"
    assert m.meta_net.linear1.in_features == e and m.meta_net.linear1.out_features == e // 16
    assert m.meta_net.linear2.out_features == tiny.text.width
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    coop = _module(tiny, "coop", {"init": "a photo of a"})
    with torch.no_grad():
        m.meta_net.linear2.weight.zero_()
        m.meta_net.linear2.bias.zero_()
        assert (m(images=x) - coop(images=x)).abs().max() < 1e-4
        # a shift makes every image's prompts differ
        m.meta_net.linear2.bias.fill_(0.5)
        feats = tiny.encode_images(x)
        xs, eot = m.text_inputs(feats.embeds)
        assert xs.shape[0] == 3 * len(NAMES) and eot.shape == (3 * len(NAMES),)
        assert (xs[: len(NAMES), 1:5] - coop.ctx - 0.5).abs().max() < 1e-6


def _reference_vpt(bb, images, prompts, deep):
    """A literal VPT forward on open_clip's modules, written independently of towers.py."""
    v = bb.model.visual
    x = v._embeds(images)
    n = prompts.shape[1]
    x = torch.cat([x[:, :1], prompts[0].expand(len(x), -1, -1), x[:, 1:]], dim=1)
    for i, blk in enumerate(v.transformer.resblocks):
        if deep and i > 0:
            x = torch.cat([x[:, :1], prompts[i].expand(len(x), -1, -1), x[:, 1 + n:]], dim=1)
        x = blk(x)
    x = torch.cat([x[:, :1], x[:, 1 + n:]], dim=1)
    pooled, _ = v._pool(x)
    return pooled, pooled @ v.proj


@pytest.mark.parametrize("method", ["vpt-shallow", "vpt-deep"])
def test_vpt_matches_literal_reference_and_init(tiny, method):
    m = _module(tiny, method, {"n_tokens": 5, "head": "clip"})
    depth, width = tiny.vision.depth, tiny.vision.width
    assert m.prompts.shape == ((depth if method == "vpt-deep" else 1), 5, width)
    v = math.sqrt(6.0 / (3 * 8 * 8 + width))
    assert m.prompts.abs().max() <= v and m.prompts.abs().max() > 0.8 * v
    m.eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        feats = m.image_features(x)
        pooled, embeds = _reference_vpt(tiny, x, m.prompts, deep=method == "vpt-deep")
    assert (feats.pooled - pooled).abs().max() < 1e-5
    assert (feats.embeds - embeds).abs().max() < 1e-5


def test_vpt_head_init(tiny):
    m = _module(tiny, "vpt-shallow", {"head": "linear"})
    assert torch.allclose(m.classifier.fc.bias, torch.full((len(NAMES),), -math.log(99.0)))
    assert m.classifier.fc.in_features == tiny.vision.pooled_dim


@pytest.mark.parametrize("method", ["vpt-shallow", "vpt-deep"])
def test_vpt_zero_tokens_equals_plain_forward(tiny, method):
    m = _module(tiny, method, {"n_tokens": 0, "head": "clip"})
    m.eval()
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(m.image_features(x).embeds, tiny.model.encode_image(x))
        prompt = TrainedPrompt(method, m.config.model_dump(mode="json"), NAMES, tiny.fingerprint, m.state_dict())
        res = prepare_resident(tiny, prompt)
        zs = prepare_resident(tiny, TrainedPrompt("zeroshot", {}, NAMES, tiny.fingerprint, {}))
        mixed = forward_mixed(tiny, [res, zs], torch.cat([x, x]), torch.tensor([0] * 5 + [1] * 5))
    # same CLIP head and template as zeroshot's single template: the same logits
    for i in range(5):
        assert (mixed[i] - mixed[5 + i]).abs().max() < 1e-5


def test_vpt_prompt_dropout_only_while_training(tiny):
    m = _module(tiny, "vpt-shallow", {"n_tokens": 6, "prompt_dropout": 0.5})
    m.train()
    assert not torch.equal(m.layer_prompts(), m.prompts)
    m.eval()
    assert torch.equal(m.layer_prompts(), m.prompts)


def test_vpt_prompt_dropout_masks_each_image(tiny):
    """VPT's reference expands the prompts to the batch before dropout: one mask per image."""
    m = _module(tiny, "vpt-deep", {"n_tokens": 6, "prompt_dropout": 0.5})
    m.train()
    tp = m.token_prompts(4)
    assert tp.first.shape == (4, 6, tiny.vision.width) and tp.deep.shape == (4, tiny.vision.depth - 1, 6, tiny.vision.width)
    kept = tp.first != 0  # (B, N, D)
    assert not torch.equal(kept[0], kept[1])
    # kept entries are the prompts scaled by 1 / (1 - p), dropped ones are 0
    ref = (m.prompts[0] * 2.0).expand(4, -1, -1)
    assert torch.allclose(tp.first[kept], ref[kept])
    assert not torch.equal(tp.deep[0] != 0, tp.deep[1] != 0)
    m.eval()
    tp = m.token_prompts(3)
    assert torch.equal(tp.first, m.prompts[0].expand(3, -1, -1))
    assert torch.equal(tp.deep, m.prompts[1:].expand(3, -1, -1, -1))


def test_padding_frame_layout(tiny):
    m = _module(tiny, "padding", {"pad": 5})
    s, p = 32, 5
    assert m.pad_up.shape == (1, 3, p, s) and m.pad_down.shape == (1, 3, p, s)
    assert m.pad_left.shape == (1, 3, s - 2 * p, p) and m.pad_right.shape == (1, 3, s - 2 * p, p)
    frame = m.pixel_frame()
    assert frame.shape == (1, 3, s, s)
    assert torch.equal(frame[:, :, :p], m.pad_up) and torch.equal(frame[:, :, s - p:], m.pad_down)
    assert torch.equal(frame[:, :, p:s - p, :p], m.pad_left) and torch.equal(frame[:, :, p:s - p, s - p:], m.pad_right)
    assert torch.count_nonzero(frame[:, :, p:s - p, p:s - p]) == 0
    # default width: 30 at 224 px, scaled
    assert _module(tiny, "padding", {}).pad == round(30 * 32 / 224)


def test_padding_zero_pads_leave_the_image_unchanged(tiny):
    m = _module(tiny, "padding", {"head": "clip"})
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m.image_features(x).embeds, tiny.model.encode_image(x))
    assert m.classifier.text_feats.shape == (len(NAMES), tiny.vision.embed_dim)


def test_linear_probe_reads_normalised_features(tiny):
    m = _module(tiny, "linear-probe", {})
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        m.linear.weight.normal_()
        f = tiny.encode_images(x)
        scaled = type(f)(pooled=f.pooled, embeds=f.embeds * 7.0)
        assert torch.allclose(m.head(f), m.head(scaled), atol=1e-6)
