"""Non-finite numbers and diverging runs in the backbone package: configs refuse them,
training stops at the first non-finite loss or parameter with a reason naming the
learning rate, and a non-finite prompt is never saved."""

from __future__ import annotations

import math

import pytest
import torch

from api.bench.seeding import random_prompt
from backbone import ConfigError, PromptFormatError, describe_config, load_prompt, method_names, tune, validate_config
from backbone.errors import DivergedError, NonFinitePrompt
from backbone.methods import get_method
from backbone.methods.registry import float_bounds


def _float_fields() -> list[tuple[str, str]]:
    return [(m, f) for m in method_names() for f in float_bounds(get_method(m).config_cls)]


@pytest.mark.parametrize("method,name", _float_fields())
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_non_finite_floats_are_refused_naming_key_and_bounds(method: str, name: str, value: float) -> None:
    b = float_bounds(get_method(method).config_cls)[name]
    with pytest.raises(ConfigError) as err:
        validate_config(method, {name: [value] if b.is_list else value})
    msg = str(err.value)
    assert f"config key '{name}" in msg and "finite number" in msg and str(b) in msg, msg


@pytest.mark.parametrize("method,name", _float_fields())
def test_every_float_field_has_finite_bounds_that_are_enforced(method: str, name: str) -> None:
    b = float_bounds(get_method(method).config_cls)[name]
    assert math.isfinite(b.lower) and math.isfinite(b.upper)
    assert describe_config(method)[name]["bounds"] == str(b)
    for outside in (b.upper if not b.upper_inclusive else b.upper * 2 + 1, b.lower - 1 if b.lower_inclusive else b.lower):
        assert not b.contains(outside)
        with pytest.raises(ConfigError, match=f"config key '{name}.*accepted: "):
            validate_config(method, {name: [outside] if b.is_list else outside})
    inside = b.upper if b.upper_inclusive else b.lower if b.lower_inclusive else (b.lower + b.upper) / 2
    validate_config(method, {name: [inside] if b.is_list else inside})  # a bound value validates on its own


def test_warmup_lr_has_the_same_upper_bound_as_lr() -> None:
    with pytest.raises(ConfigError, match="'warmup_lr'.*warmup_lr > 0 and <= 10000"):
        validate_config("coop", {"epochs": 10, "warmup_epochs": 1, "warmup_lr": 1e30})
    assert validate_config("coop", {"warmup_lr": 1e4})["warmup_lr"] == 1e4


@pytest.mark.parametrize(
    "method,config,cause",
    [
        ("coop", {"epochs": 10, "warmup_epochs": 1, "warmup_lr": 1e4, "weight_decay": 1.0, "n_ctx": 2, "batch_size": 1},
         "warmup_lr is probably too high (warmup_lr=10000, lr=0.002)"),
        ("padding", {"epochs": 2, "lr": 1e4, "weight_decay": 1.0, "pad": 4, "batch_size": 1},
         "the learning rate is probably too high (lr=10000), made worse by weight_decay=1 and momentum=0.9"),
        ("vpt-shallow", {"epochs": 2, "lr": 1e4, "weight_decay": 1.0, "optimizer": "adamw", "n_tokens": 2,
                         "batch_size": 1},
         "the learning rate is probably too high (lr=10000), made worse by weight_decay=1;"),
    ],
)
def test_training_stops_at_the_first_non_finite_loss(tiny, classes, train_data, method, config, cause) -> None:
    images, labels = train_data
    seen = []
    with pytest.raises(DivergedError) as err:
        tune(tiny, method, classes, images, labels, config, on_progress=seen.append)
    msg = str(err.value)
    assert msg.startswith("training diverged: ") and cause in msg and "lower it and retrain" in msg, msg
    assert "epoch 1 of" in msg and "step " in msg, msg
    assert isinstance(err.value, ConfigError)  # a fault of the config, as the worker reports it
    assert all(p.loss is None or math.isfinite(p.loss) for p in seen)


def test_training_stops_at_a_non_finite_parameter(tiny, classes, train_data, monkeypatch) -> None:
    """A step that leaves a parameter non-finite stops the run even while the loss was finite."""
    images, labels = train_data
    real_step = torch.optim.SGD.step
    calls = {"n": 0}

    def step(self, *a, **kw):
        out = real_step(self, *a, **kw)
        calls["n"] += 1
        if calls["n"] == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(math.inf)
        return out

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    with pytest.raises(DivergedError, match="learned tensor '.*' became non-finite at epoch .*step 2 of"):
        tune(tiny, "coop", classes, images, labels, {"epochs": 3, "n_ctx": 2, "batch_size": 8})


def test_linear_probe_fit_that_goes_non_finite_fails(tiny, classes, train_data, monkeypatch) -> None:
    from backbone.methods.linear_probe import LinearProbeModule

    images, labels = train_data

    def fit(self, x, y, l2, max_iter):
        with torch.no_grad():
            self.linear.weight.fill_(math.nan)
        return math.nan

    monkeypatch.setattr(LinearProbeModule, "fit", fit)
    with pytest.raises(DivergedError, match=r"L-BFGS fit 1 of 1 \(l2=0.5\)"):
        tune(tiny, "linear-probe", classes, images, labels, {"l2_grid": [0.5]})


def test_finite_runs_are_unchanged_by_the_checks(tiny, classes, train_data) -> None:
    images, labels = train_data
    cfg = {"epochs": 3, "n_ctx": 2, "batch_size": 8}
    a = tune(tiny, "coop", classes, images, labels, cfg)
    b = tune(tiny, "coop", classes, images, labels, cfg)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    assert all(math.isfinite(h["loss"]) for h in a.history)
    for k, v in a.prompt.tensors.items():
        assert torch.equal(v, b.prompt.tensors[k])


def test_a_non_finite_prompt_is_never_saved(tiny, classes) -> None:
    prompt = random_prompt(tiny, "coop", classes, {"n_ctx": 2})
    ok = prompt.to_bytes()
    assert load_prompt(ok, tiny).tensors.keys() == prompt.tensors.keys()
    for bad in (math.nan, math.inf, -math.inf):
        name = next(iter(prompt.tensors))
        t = prompt.tensors[name].clone()
        t.view(-1)[0] = bad
        broken = type(prompt)(prompt.method, prompt.config, prompt.classes, prompt.fingerprint, {**prompt.tensors, name: t})
        with pytest.raises(NonFinitePrompt, match=f"tensor '{name}' holds NaN or infinite values") as err:
            broken.to_bytes(extra={"version": "1"})
        assert isinstance(err.value, PromptFormatError)
