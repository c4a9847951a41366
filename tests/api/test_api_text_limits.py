"""Class prompts the text encoder cannot hold, or cannot tell apart, are refused over HTTP
with a 422 naming the class(es), the token count and the limit, at create and at retrain,
and nothing is stored (backbone/methods/base.py ``check_text_prompts``)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import open_clip
import pytest
from apiclient import Api, embedded_settings, running_app
from psdata import dataset_zip, image_bytes, make_zip

#: The issue's input: two class names of ~95 words that differ only in their last words.
STEM = " ".join(f"part{i}" for i in range(93))
LONG_A, LONG_B = STEM + " tabby cat", STEM + " tiger cat"


def _count(text: str) -> int:
    """open_clip's own BPE count of a prompt, SOT and EOT added, no cut."""
    from backbone.loading import register_model_configs

    register_model_configs()
    return len(open_clip.get_tokenizer("tiny").encode(text)) + 2


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    with running_app(embedded_settings(tmp_path_factory.mktemp("textlimits"))) as client:
        yield Api(client)


@pytest.fixture
def tenant(api: Api) -> dict[str, str]:
    return api.tenant()


def _stored_objects(api: Api) -> list[str]:
    # other tests of this module's app may still be tuning: their prompts must not land between
    # the two listings that are compared
    assert api.state.dispatcher.wait_idle(120), "jobs of earlier tests did not finish"
    root = Path(api.state.settings.object_store_url[len("file://") :])
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def _refused(api: Api, tenant: dict[str, str], r: Any, *needles: str) -> str:
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    for needle in needles:
        assert needle in detail, (needle, detail)
    assert api.client.get("/v1/tasks", headers=tenant).json()["count"] == 0
    return detail


# ------------------------------------------------------------------ too long at create


def test_the_issue_s_zeroshot_task_is_refused_naming_both_classes(api: Api, tenant: dict[str, str]) -> None:
    assert _count(f"a photo of a {LONG_A}.") > 77
    r = api.create_task(tenant, "zeroshot", classes=[LONG_A, LONG_B, "dog"], expect=None)
    _refused(
        api, tenant, r, f"'{LONG_A}'", f"'{LONG_B}'", f"{_count(f'a photo of a {LONG_A}.')} tokens",
        f"{_count(f'a photo of a {LONG_B}.')} tokens", "limit of 77",
    )
    assert "'dog'" not in r.json()["detail"]


def test_a_zeroshot_ensemble_counts_its_longest_template(api: Api, tenant: dict[str, str]) -> None:
    from open_clip import zero_shot_metadata as z

    templates = [t("{}") for t in z.SIMPLE_IMAGENET_TEMPLATES]
    # a name that fits the single template but not the longest of the 7
    name = " ".join(["word"] * (75 - _count("a photo of a {}.".format("")) + 2))
    counts = [_count(t.format(name)) for t in templates]
    assert _count(f"a photo of a {name}.") <= 77 < max(counts)
    api.create_task(tenant, "zeroshot", classes=[name, "dog"], expect=202)
    r = api.create_task(tenant, "zeroshot", classes=[name, "dog"], config={"templates": "ensemble"}, expect=None)
    assert r.status_code == 422 and f"'{name}' makes a text prompt of {max(counts)} tokens" in r.json()["detail"]


@pytest.mark.parametrize(
    ("method", "config", "prompt"),
    [("coop", {"epochs": 1, "n_ctx": 4}, "X X X X {}."), ("padding", {"epochs": 1}, "This is a photo of a {}"),
     ("vpt-shallow", {"epochs": 1, "head": "clip"}, "a photo of a {}.")],
)
def test_a_dataset_with_long_folder_names_is_refused_and_nothing_is_stored(
    api: Api, tenant: dict[str, str], method: str, config: dict, prompt: str
) -> None:
    long = STEM + " " + method.replace("-", " ")
    before = _stored_objects(api)
    r = api.create_task(tenant, method, dataset=dataset_zip((long, "dog"), per_class=2), config=config, expect=None)
    _refused(api, tenant, r, f"'{long}'", f"{_count(prompt.format(long))} tokens", "limit of 77", method)
    assert _stored_objects(api) == before


def test_a_long_display_name_from_classes_json_is_refused(api: Api, tenant: dict[str, str]) -> None:
    entries = {"a/1.png": image_bytes(0), "b/1.png": image_bytes(1), "classes.json": f'{{"a": "{LONG_A}"}}'.encode()}
    r = api.create_task(tenant, "cocoop", dataset=make_zip(entries), config={"epochs": 1}, expect=None)
    _refused(api, tenant, r, f"'{LONG_A}'", f"{_count('X X X X ' + LONG_A + '.')} tokens")


# ------------------------------------------------------------------ ties at create


@pytest.mark.parametrize(
    ("a", "b"),
    [("Cat", "cat"), ("sea  lion", "sea lion"), ("dog_house", "dog house"), ("CAT", "cat")],
    ids=["case", "whitespace", "underscore", "upper"],
)
def test_zeroshot_classes_with_the_same_tokens_are_refused(api: Api, tenant: dict[str, str], a: str, b: str) -> None:
    r = api.create_task(tenant, "zeroshot", classes=[a, "fish", b], expect=None)
    detail = _refused(api, tenant, r, f"'{a}'", f"'{b}'", "same text tokens")
    assert "'fish'" not in detail


@pytest.mark.parametrize(
    ("method", "a", "b"),
    [("padding", "t-shirt", "t shirt"), ("coop", "dog_house", "Dog House"), ("cocoop", "Sea_Lion", "sea lion")],
)
def test_dataset_classes_with_the_same_tokens_are_refused(
    api: Api, tenant: dict[str, str], method: str, a: str, b: str
) -> None:
    before = _stored_objects(api)
    r = api.create_task(tenant, method, dataset=dataset_zip((a, b), per_class=2), config={"epochs": 1}, expect=None)
    _refused(api, tenant, r, f"'{a}'", f"'{b}'", "same text tokens")
    assert _stored_objects(api) == before


def test_names_that_only_tie_under_another_method_s_rule_are_accepted(api: Api, tenant: dict[str, str]) -> None:
    """CoOp reads only '_' as a space: 't-shirt' and 't shirt' stay apart; a method without text
    takes names that differ in case."""
    r = api.create_task(tenant, "coop", dataset=dataset_zip(("t-shirt", "t shirt"), per_class=2),
                        config={"epochs": 1, "n_ctx": 2})
    api.wait_ready(tenant, r.json()["id"])
    r = api.create_task(tenant, "linear-probe", dataset=dataset_zip(("Cat", "cat"), per_class=2),
                        config={"max_iter": 5})
    api.wait_ready(tenant, r.json()["id"])


# ------------------------------------------------------------------ retrain


def test_a_retrain_whose_config_makes_a_prompt_too_long_is_refused(api: Api, tenant: dict[str, str]) -> None:
    name = " ".join(["word"] * 20)  # 16 + 20 + 3 = 39 tokens: fits; 64 + 20 + 3 = 87: does not
    data = dataset_zip((name, "dog"), per_class=2)
    task = api.create_task(tenant, "coop", dataset=data, config={"epochs": 1}).json()
    api.wait_ready(tenant, task["id"])
    objects = _stored_objects(api)
    r = api.client.post(
        f"/v1/tasks/{task['id']}/retrain", data={"config": '{"epochs": 1, "n_ctx": 64}'}, headers=tenant
    )
    assert r.status_code == 422, r.text
    assert f"'{name}' makes a text prompt of 87 tokens" in r.json()["detail"] and "limit of 77" in r.json()["detail"]
    after = api.task(tenant, task["id"])
    assert after["status"] == "ready" and after["config"]["n_ctx"] is None and _stored_objects(api) == objects
    # a new dataset with a tie, under the kept config
    r = api.client.post(
        f"/v1/tasks/{task['id']}/retrain", headers=tenant,
        files={"dataset": ("d.zip", dataset_zip(("dog_house", "dog  house"), per_class=2), "application/zip")},
    )
    assert r.status_code == 422 and "'dog_house'" in r.json()["detail"] and "'dog  house'" in r.json()["detail"], r.text
    assert _stored_objects(api) == objects


def test_a_zeroshot_retrain_with_a_long_custom_template_is_refused(api: Api, tenant: dict[str, str]) -> None:
    task = api.create_task(tenant, "zeroshot", classes=["cat", "dog"]).json()
    api.wait_ready(tenant, task["id"])
    template = " ".join(["very"] * 80) + " {}"
    config = {"custom_templates": ["a photo of a {}.", template]}
    r = api.client.post(f"/v1/tasks/{task['id']}/retrain", data={"config": json.dumps(config)}, headers=tenant)
    assert r.status_code == 422, r.text
    assert f"'cat' makes a text prompt of {_count(template.format('cat'))} tokens" in r.json()["detail"]
    after = api.task(tenant, task["id"])
    assert after["config"]["custom_templates"] is None and after["training"] is None and after["version"] == 1


# ------------------------------------------------------------------ no tokenizer at hand


def test_no_tokenizer_answers_503_rather_than_skipping_the_check() -> None:
    from api.errors import ApiError
    from api.routes.tasks import text_tokens
    from backbone.holder import BackboneHolder

    class State:  # a holder that never loaded, for a spec whose tokenizer cannot be built
        backbone = BackboneHolder("open_clip:no-such-arch:random", "cpu")

    with pytest.raises(ApiError) as exc:
        text_tokens(State())  # type: ignore[arg-type]
    assert exc.value.status_code == 503 and exc.value.headers.get("Retry-After")
    State.backbone = BackboneHolder("open_clip:tiny:random@7", "cpu")  # not loaded: the spec's tokenizer
    assert text_tokens(State()).context_length == 77  # type: ignore[arg-type]
