"""Class prompts the text encoder cannot hold are refused, never cut; classes whose prompts
make the same tokens are refused; each method prepares class names as its authors' code does.

The backstop in ``build_module`` (and so ``tune``) raises ConfigError with the message the
API answers (tests/api/test_api_text_limits.py)."""

from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F

from bbtest_helpers import TINY, make_images

from backbone import ConfigError, tune
from backbone.loading import TextTokens, register_model_configs, text_tokens_for_spec
from backbone.methods import check_class_texts, describe_config, get_method, parse_config
from backbone.methods.base import lower_underscores_hyphens_to_spaces, underscores_to_spaces
from backbone.tuning import build_module

#: The issue's input: two names of ~95 words that differ only in their last word.
STEM = " ".join(f"part{i}" for i in range(94))
LONG_A, LONG_B = STEM + " alpha", STEM + " omega"


def _reference_count(text: str) -> int:
    """open_clip's own BPE, SOT and EOT added, no context cut."""
    register_model_configs()
    tok = open_clip.get_tokenizer("tiny")
    return len(tok.encode(text)) + 2


def _build(bb, method: str, classes: list[str], config: dict | None = None):
    return build_module(bb, get_method(method), classes, parse_config(method, config or {}))


# ------------------------------------------------------------------ counting


def test_count_tokens_is_the_untruncated_count(tiny) -> None:
    short = ["a photo of a cat.", "x"]
    ids = tiny.tokenize(short)
    assert tiny.count_tokens(short) == [int(i) + 1 for i in ids.argmax(dim=-1)]  # EOT position + 1
    long = "a photo of a " + LONG_A + "."
    assert tiny.count_tokens([long]) == [_reference_count(long)]
    assert _reference_count(long) > 77 == tiny.text_context_length
    assert int(tiny.tokenize([long]).argmax(dim=-1)) == 76  # what tokenize alone would have done: cut


def test_tokenizer_from_the_spec_matches_the_loaded_backbone(tiny) -> None:
    tokens = text_tokens_for_spec(TINY)
    assert isinstance(tokens, TextTokens) and tokens.context_length == tiny.text_context_length
    texts = ["a photo of a cat.", LONG_A, "T-shirt  top"]
    assert tokens.ids(texts) == tiny.text_tokens.ids(texts)
    assert text_tokens_for_spec("auto").context_length == 77
    assert text_tokens_for_spec("timm:vit_tiny_patch16_224:random") is None


# ------------------------------------------------------------------ too long


@pytest.mark.parametrize(
    ("method", "config"),
    [("zeroshot", {}), ("zeroshot", {"templates": "ensemble"}), ("coop", {"n_ctx": 4}), ("cocoop", {}),
     ("padding", {}), ("padding", {"head": "clip"}), ("vpt-shallow", {"head": "clip"}),
     ("vpt-deep", {"head": "clip"})],
)
def test_a_long_class_is_refused_naming_it_its_count_and_the_limit(tiny, method: str, config: dict) -> None:
    with pytest.raises(ConfigError) as exc:
        _build(tiny, method, [LONG_A, LONG_B, "cat"], config)
    msg = str(exc.value)
    assert f"'{LONG_A}'" in msg and f"'{LONG_B}'" in msg and "'cat'" not in msg
    assert "limit of 77" in msg and "tokens" in msg


def test_the_count_in_the_message_is_the_prompt_s(tiny) -> None:
    with pytest.raises(ConfigError) as exc:
        _build(tiny, "zeroshot", [LONG_A, "dog"])
    assert f"{_reference_count('a photo of a ' + LONG_A + '.')} tokens" in str(exc.value)
    # coop: n_ctx placeholder words, the name, "."
    name = " ".join(["word"] * 20)
    _build(tiny, "coop", [name, "dog"], {"n_ctx": 16})  # 16 + 20 + 3 = 39: fits
    with pytest.raises(ConfigError) as exc:
        _build(tiny, "coop", [name, "dog"], {"n_ctx": 64})
    assert f"'{name}' makes a text prompt of {64 + 20 + 3} tokens" in str(exc.value)
    assert "n_ctx" in str(exc.value)


def test_a_prompt_that_just_fits_is_built(tiny) -> None:
    # coop with n_ctx 16: 1 + 16 + name + 1 + 1 = 77 at 58 name tokens
    fits, over = " ".join(["word"] * 58), " ".join(["word"] * 59)
    m = _build(tiny, "coop", [fits, "dog"], {"n_ctx": 16})
    assert int(m.eot[0]) == 76
    with pytest.raises(ConfigError, match="78 tokens"):
        _build(tiny, "coop", [over, "dog"], {"n_ctx": 16})


def test_a_long_custom_template_is_refused(tiny) -> None:
    template = " ".join(["very"] * 80) + " {}"
    with pytest.raises(ConfigError, match="'cat' makes a text prompt of 83 tokens"):
        _build(tiny, "zeroshot", ["cat", "dog"], {"custom_templates": ["a photo of a {}.", template]})


def test_methods_without_text_take_any_name(tiny) -> None:
    for method, config in [("vpt-shallow", {}), ("padding", {"head": "linear"}), ("linear-probe", {})]:
        _build(tiny, method, [LONG_A, LONG_B, "Cat", "cat"], config)


# ------------------------------------------------------------------ ties


@pytest.mark.parametrize(
    ("method", "config", "a", "b"),
    [
        ("zeroshot", {}, "Cat", "cat"),  # the tokenizer lowercases
        ("zeroshot", {}, "dog  house", "dog house"),  # and drops extra whitespace
        ("zeroshot", {}, "dog_house", "dog house"),  # '_' is a space here
        ("zeroshot", {"custom_templates": ["a photo"]}, "cat", "dog"),  # refused earlier, by the config
        ("coop", {"n_ctx": 2}, "dog_house", "dog\thouse"),
        ("cocoop", {}, "Sea Lion", "sea_lion"),
        ("padding", {}, "t-shirt", "t shirt"),  # the padding authors read '-' as a space
        ("padding", {}, "T-Shirt", "t_shirt"),
        ("vpt-shallow", {"head": "clip", "template": "a photo"}, "cat", "dog"),  # a template without a name
    ],
)
def test_classes_with_the_same_tokens_are_refused_naming_both(tiny, method: str, config: dict, a: str, b: str) -> None:
    with pytest.raises(ConfigError) as exc:
        _build(tiny, method, [a, "fish", b], config)
    msg = str(exc.value)
    if "custom_templates" in config or "template" in config:
        assert "{}" in msg
        return
    assert f"'{a}'" in msg and f"'{b}'" in msg and "'fish'" not in msg
    assert "same text tokens" in msg


def test_coop_keeps_hyphens_so_t_shirt_and_t_shirt_differ(tiny) -> None:
    _build(tiny, "coop", ["t-shirt", "t shirt"], {"n_ctx": 2})
    _build(tiny, "zeroshot", ["t-shirt", "t shirt"])


def test_class_specific_contexts_are_refused_too(tiny) -> None:
    with pytest.raises(ConfigError, match="'Cat' and 'cat'"):
        _build(tiny, "coop", ["Cat", "cat"], {"n_ctx": 2, "class_specific": True})


def test_several_offenders_are_counted(tiny) -> None:
    names = [f"{STEM} n{i}" for i in range(6)]
    with pytest.raises(ConfigError, match="and 3 more classes"):
        check_class_texts("zeroshot", names, {}, tiny.text_tokens)


# ------------------------------------------------------------------ name rules


def test_name_rules_follow_the_reference_code() -> None:
    assert underscores_to_spaces("T-Shirt_top") == "T-Shirt top"  # CoOp: name.replace("_", " ")
    # Bahng et al.: class_name.lower().replace('_', ' ').replace('-', ' ')
    assert lower_underscores_hyphens_to_spaces("T-Shirt_top") == "t shirt top"
    assert get_method("padding").module_cls.prepare_class_name is lower_underscores_hyphens_to_spaces
    for m in ("zeroshot", "coop", "cocoop", "vpt-shallow", "vpt-deep"):
        assert get_method(m).module_cls.prepare_class_name is underscores_to_spaces
    for m in ("zeroshot", "coop", "cocoop", "padding", "vpt-shallow", "vpt-deep"):
        described = " ".join(f["description"] for f in describe_config(m).values())
        assert "'_'" in described and "77" in described, m
    assert "'-'" in " ".join(f["description"] for f in describe_config("padding").values())
    for m in ("zeroshot", "coop", "cocoop", "padding"):
        assert "refused" in (get_method(m).config_cls.__doc__ or ""), m


def test_padding_text_head_reads_hyphens_as_spaces(tiny) -> None:
    m = _build(tiny, "padding", ["T-shirt_top", "sea-lion"])
    texts = ["This is a photo of a t shirt top", "This is a photo of a sea lion"]
    want = F.normalize(tiny.encode_text(texts).float(), dim=-1)
    torch.testing.assert_close(m.classifier.text_feats, want)


def test_zeroshot_and_coop_prompts_are_unchanged_for_names_that_fit(tiny) -> None:
    m = _build(tiny, "zeroshot", ["dog_house", "t-shirt"])
    want = F.normalize(tiny.encode_text(["a photo of a dog house.", "a photo of a t-shirt."]).float(), dim=-1)
    torch.testing.assert_close(m.text_feats, want)
    c = _build(tiny, "coop", ["dog_house", "t-shirt"], {"n_ctx": 3})
    assert torch.equal(c.eot, tiny.tokenize(["X X X dog house.", "X X X t-shirt."]).argmax(dim=-1))


# ------------------------------------------------------------------ the backstop


def test_tune_never_tunes_a_cut_prompt(tiny) -> None:
    images, labels = make_images(2, 2, seed=0)
    with pytest.raises(ConfigError, match="limit of 77"):
        tune(tiny, "coop", [LONG_A, LONG_B], images, labels, {"epochs": 1, "n_ctx": 2})
    with pytest.raises(ConfigError, match="same text tokens"):
        tune(tiny, "padding", ["t-shirt", "T shirt"], images, labels, {"epochs": 1})
    with pytest.raises(ConfigError, match="same text tokens"):
        tune(tiny, "zeroshot", ["Cat", "cat"], None, None)


def test_the_worker_reports_it_as_an_invalid_config() -> None:
    from worker.jobs import failure_reason

    reason = failure_reason(ConfigError("method coop: class 'x' makes a text prompt of 80 tokens"))
    assert reason is not None and reason.startswith("invalid config:") and "80 tokens" in reason
