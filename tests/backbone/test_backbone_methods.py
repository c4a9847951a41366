"""Every registered method: gradients reach only the prompt, the backbone is untouched,
save -> load gives the same logits, another backbone is refused, and the method learns
a small synthetic task on open_clip:tiny:random."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bbtest_helpers import FAST, LEARN, TRAINED_METHODS

from backbone import ConfigError, PromptMismatch, load_prompt, method_names, prepare_resident, tune, validate_config
from backbone.methods import get_method, parse_config
from backbone.tuning import build_module

_TUNED: dict[str, object] = {}


def tuned(method, tiny, classes, train_data):
    """One tuning run per method, shared by the tests of this module."""
    if method not in _TUNED:
        images, labels = train_data
        snapshot = {k: v.clone() for k, v in tiny.model.state_dict().items()}
        if not get_method(method).needs_dataset:
            result = tune(tiny, method, classes, None, None, FAST[method])
        else:
            result = tune(tiny, method, classes, images, labels, FAST[method])
        _TUNED[method] = (result, snapshot)
    return _TUNED[method]


def test_registry_order_and_names():
    assert method_names() == [
        "zeroshot", "coop", "cocoop", "vpt-shallow", "vpt-deep", "padding", "fixed-patch", "random-patch", "linear-probe",
    ]


@pytest.mark.parametrize("method", method_names())
def test_every_method_declares_a_quick_smoke_config(method, tiny, classes, train_data):
    """The registry's smoke config (used by the e2e tests and the benches) validates and tunes
    in about a second on the tiny backbone; only zeroshot needs no dataset."""
    import time

    spec = get_method(method)
    assert isinstance(spec.smoke_config, dict)
    validate_config(method, spec.smoke_config)
    assert spec.needs_dataset == (method != "zeroshot")
    images, labels = train_data
    started = time.perf_counter()
    result = tune(tiny, method, classes, images if spec.needs_dataset else None,
                  labels if spec.needs_dataset else None, spec.smoke_config)
    assert time.perf_counter() - started < 5.0, f"{method}'s smoke config is not quick"
    assert result.prompt.method == method


@pytest.mark.parametrize("method", method_names())
def test_only_prompt_parameters_receive_gradients(method, tiny, classes, train_data):
    images, labels = train_data
    cfg = parse_config(method, FAST[method])
    # Seeded: on the tiny backbone CoCoOp's meta-net has 4 hidden ReLUs, and some random
    # draws leave all of them dead for these 8 images (a zero gradient, but a correct one).
    torch.manual_seed(0)
    module = build_module(tiny, get_method(method), classes, cfg)
    module.train()
    params = list(module.parameters())
    backbone_ids = {id(p) for p in tiny.model.parameters()}
    assert not any(id(p) in backbone_ids for p in params), "a backbone parameter leaked into the prompt"
    if method == "zeroshot":
        assert params == []
        return
    assert all(p.requires_grad for p in params)
    loss = F.cross_entropy(module(images=images[:8]), labels[:8])
    loss.backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
    assert all(p.grad is None and not p.requires_grad for p in tiny.model.parameters())


@pytest.mark.parametrize("method", method_names())
def test_backbone_bit_identical_after_training(method, tiny, classes, train_data):
    result, snapshot = tuned(method, tiny, classes, train_data)
    after = tiny.model.state_dict()
    assert snapshot.keys() == after.keys()
    for k, v in snapshot.items():
        assert torch.equal(v, after[k]), f"backbone tensor {k} changed"
    assert not any(m.training for m in tiny.model.modules())


@pytest.mark.parametrize("method", method_names())
def test_save_load_same_logits(method, tiny, classes, train_data, test_data):
    result, _ = tuned(method, tiny, classes, train_data)
    images, _ = test_data
    data = result.prompt.to_bytes({"task_id": "t1", "version": "3"})
    loaded = load_prompt(data, tiny)
    assert loaded.method == method and loaded.classes == classes
    assert loaded.config == result.prompt.config and loaded.extra == {"task_id": "t1", "version": "3"}
    assert loaded.tensors.keys() == result.prompt.tensors.keys()
    before = prepare_resident(tiny, result.prompt).forward(images)
    after = prepare_resident(tiny, loaded).forward(images)
    assert before.shape == (len(images), len(classes))
    assert torch.equal(before, after)


@pytest.mark.parametrize("method", method_names())
def test_prompt_refuses_another_backbone(method, tiny, tiny_other, classes, train_data):
    result, _ = tuned(method, tiny, classes, train_data)
    data = result.prompt.to_bytes()
    with pytest.raises(PromptMismatch) as err:
        load_prompt(data, tiny_other)
    assert tiny.fingerprint in str(err.value) and tiny_other.fingerprint in str(err.value)
    # checked once, where the bytes are loaded: serving trusts a loaded TrainedPrompt


@pytest.mark.parametrize("method", [m for m in TRAINED_METHODS if m in LEARN])
def test_learns_synthetic_task_well_above_chance(method, tiny, classes, train_data, test_data):
    images, labels = train_data
    result = tune(tiny, method, classes, images, labels, LEARN[method])
    images, labels = test_data
    acc = (prepare_resident(tiny, result.prompt).forward(images).argmax(dim=-1) == labels).float().mean().item()
    chance = 1.0 / len(classes)
    assert acc >= 0.6, f"{method}: held-out accuracy {acc:.2f} (chance {chance:.2f})"
    assert result.metrics["train_accuracy"] >= 0.6


def test_zeroshot_needs_no_data_and_reports_no_accuracy(tiny, classes, train_data):
    result, _ = tuned("zeroshot", tiny, classes, train_data)
    assert result.metrics["n_train"] == 0 and result.metrics["n_val"] == 0
    assert result.metrics["val_accuracy"] is None
    assert result.confusion == []  # no validation split: no all-zero matrix (stored as null)


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize("method", method_names())
def test_defaults_validate_and_are_copies(method):
    full = validate_config(method, None)
    assert full == validate_config(method, {})
    assert full["seed"] == 0
    full["seed"] = 99  # mutating the returned dict changes no shared default
    assert validate_config(method, None)["seed"] == 0
    assert parse_config(method, full).seed == 99


@pytest.mark.parametrize("method", method_names())
def test_unknown_key_is_named(method):
    with pytest.raises(ConfigError, match="unknown config key 'bogus'.*accepted keys: seed"):
        validate_config(method, {"bogus": 1})


@pytest.mark.parametrize(
    "method, config, needle",
    [
        ("nope", {}, "unknown method 'nope'; known methods: zeroshot, coop, cocoop"),
        ("coop", {"lr": 0}, "config key 'lr'"),
        ("coop", {"class_token_position": "left"}, "class_token_position"),
        ("coop", {"epochs": 5, "warmup_epochs": 5}, "warmup_epochs \\(5\\) must be smaller than epochs \\(5\\)"),
        ("coop", {"init": "   "}, "init must contain words"),
        ("vpt-deep", {"n_tokens": -1}, "n_tokens"),
        ("vpt-shallow", {"head": "mlp"}, "head"),
        ("padding", {"pad": 0}, "pad"),
        ("zeroshot", {"custom_templates": ["no slot"]}, "exactly once"),
        ("linear-probe", {"l2_grid": [-1.0]}, ">= 0"),
        ("coop", [1, 2], "must be a JSON object"),
    ],
)
def test_invalid_configs_are_rejected(method, config, needle):
    with pytest.raises(ConfigError, match=needle):
        validate_config(method, config)


def test_backbone_dependent_checks(tiny, classes, train_data):
    images, labels = train_data
    with pytest.raises(ConfigError, match="does not match init 'a photo of a', which is 4 tokens"):
        tune(tiny, "coop", classes, images, labels, {"init": "a photo of a", "n_ctx": 3, "epochs": 1})
    with pytest.raises(ConfigError, match="2 \\* pad must be smaller than the image size 32"):
        tune(tiny, "padding", classes, images, labels, {"pad": 16, "epochs": 1})


def test_text_methods_refuse_timm_backbone_image_methods_work():
    from backbone import load_backbone

    bb = load_backbone("timm:vit_tiny_patch16_224:random@0", device="cpu")
    g = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, 224, 224, generator=g)
    labels = torch.tensor([0, 1, 0, 1])
    for method in ("zeroshot", "coop", "cocoop"):
        with pytest.raises(ConfigError, match="needs a CLIP text tower"):
            tune(bb, method, ["a", "b"], images, labels, {})
    with pytest.raises(ConfigError, match="head 'clip' needs a CLIP text tower"):
        tune(bb, "vpt-shallow", ["a", "b"], images, labels, {"head": "clip", "epochs": 1})
    for method, cfg in [
        ("vpt-deep", {"epochs": 1, "n_tokens": 2, "batch_size": 4}),
        ("padding", {"epochs": 1, "batch_size": 4}),
        ("linear-probe", {"l2_grid": [1e-2], "val_fraction": 0.0}),
    ]:
        r = tune(bb, method, ["a", "b"], images, labels, cfg)
        logits = prepare_resident(bb, r.prompt).forward(images)
        assert logits.shape == (4, 2) and torch.isfinite(logits).all()
