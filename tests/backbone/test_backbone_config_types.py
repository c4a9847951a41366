"""Configs take JSON values of the documented type only: a string for a number, a number for a
boolean or a float for an integer is refused with the key named, never coerced (a user who
sends {"class_specific": "yes"} must not get a run they did not ask for). Parametrised over
every field of every registered method, from the config classes' JSON schema."""

from __future__ import annotations

from typing import Any

import pytest

from backbone import ConfigError
from backbone.methods import get_method, method_names, validate_config


def _wrong_values(prop: dict[str, Any]) -> list[Any]:
    kinds = {o.get("type") for o in prop.get("anyOf", [prop])} | ({"enum"} if "enum" in prop else set())
    wrong: list[Any] = []
    if "integer" in kinds:
        wrong += ["3", 2.0, True]
    elif "number" in kinds:
        wrong += ["0.1", True]
    if "boolean" in kinds:
        wrong += ["yes", 1, "true"]
    if "string" in kinds or "enum" in kinds:
        wrong += [1, ["a"]]
    if "array" in kinds:
        wrong += ["[1, 2]", 1.0]
    return wrong


CASES = [
    (m, name, value)
    for m in method_names()
    for name, prop in get_method(m).config_cls.model_json_schema()["properties"].items()
    for value in _wrong_values(prop)
]


@pytest.mark.parametrize(("method", "key", "value"), CASES, ids=[f"{m}-{k}-{v!r}" for m, k, v in CASES])
def test_a_value_of_the_wrong_type_is_refused_naming_the_key(method: str, key: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=rf"config key '{key}'"):
        validate_config(method, {key: value})


def test_ints_stay_valid_floats_and_seeds_are_bounded() -> None:
    assert validate_config("coop", {"lr": 1, "epochs": 2})["lr"] == 1.0
    assert validate_config("coop", {"seed": 2**32 - 1})["seed"] == 2**32 - 1
    for seed in (2**32, 99999999999999999999999):
        with pytest.raises(ConfigError, match=r"config key 'seed'"):
            validate_config("coop", {"seed": seed})
