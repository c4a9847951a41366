"""Prompt artifacts: safetensors bytes with metadata, never pickle; clear errors."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from backbone import (
    FORMAT_VERSION,
    PromptFormatError,
    PromptMismatch,
    TrainedPrompt,
    load_prompt,
    prepare_resident,
    read_prompt_metadata,
    tune,
)


@pytest.fixture(scope="module")
def prompt(tiny, classes, train_data):
    images, labels = train_data
    return tune(tiny, "coop", classes, images, labels, {"epochs": 1, "n_ctx": 2}).prompt


def test_metadata(prompt, tiny, classes):
    data = prompt.to_bytes({"version": "2", "task_id": "abc"})
    meta = read_prompt_metadata(data)
    assert meta["method"] == "coop" and meta["backbone"] == tiny.spec and meta["fingerprint"] == tiny.fingerprint
    assert meta["format_version"] == FORMAT_VERSION
    assert json.loads(meta["classes"]) == classes
    assert json.loads(meta["config"])["n_ctx"] == 2
    assert json.loads(meta["metrics"])["n_train"] == prompt.metrics["n_train"]
    assert meta["version"] == "2" and meta["task_id"] == "abc"


def test_bytes_are_plain_safetensors(prompt):
    data = prompt.to_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    assert set(header) == {"__metadata__", "ctx"}
    assert header["ctx"]["dtype"] == "F32"
    assert b"\x80\x04" not in data[:2] and b"PK" != data[:2]  # not a pickle, not a torch zip


def test_reserved_extra_keys_are_refused(prompt):
    with pytest.raises(ValueError, match="reserved"):
        prompt.to_bytes({"fingerprint": "x"})


@pytest.mark.parametrize(
    "data, needle",
    [
        (b"", "shorter than"),
        (b"garbage-garbage", "header length exceeds"),
        (struct.pack("<Q", 4) + b"nope", "not JSON"),
        (struct.pack("<Q", 2) + b"{}", "no prompt metadata"),
    ],
)
def test_not_a_prompt(tiny, data, needle):
    with pytest.raises(PromptFormatError, match=needle):
        load_prompt(data, tiny)


def test_metadata_without_prompt_keys(tiny):
    from safetensors.torch import save

    data = save({"x": torch.zeros(2)}, metadata={"method": "coop"})
    with pytest.raises(PromptFormatError, match="lacks"):
        read_prompt_metadata(data)


def test_tensors_that_do_not_fit_the_method(tiny, prompt):
    bad = TrainedPrompt("coop", prompt.config, prompt.classes, tiny.fingerprint, {"ctx": torch.zeros(7, 3)})
    loaded = load_prompt(bad.to_bytes(), tiny)
    with pytest.raises(PromptFormatError, match="do not fit method coop"):
        prepare_resident(tiny, loaded)


def test_invalid_config_in_metadata(tiny, prompt):
    bad = TrainedPrompt("coop", {**prompt.config, "bogus": 1}, prompt.classes, tiny.fingerprint, prompt.tensors)
    with pytest.raises(PromptFormatError, match="unknown config key 'bogus'"):
        load_prompt(bad.to_bytes(), tiny)


def test_mismatch_names_both_fingerprints(tiny, tiny_other, prompt):
    with pytest.raises(PromptMismatch, match="trained on backbone open_clip:tiny:random@0#.* but this backbone is open_clip:tiny:random@1#"):
        load_prompt(prompt.to_bytes(), tiny_other)
