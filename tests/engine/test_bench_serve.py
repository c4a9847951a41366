"""``promptstore bench serve`` end to end on the tiny backbone: a few tasks, 2 seconds.
Checks that every measurement is there and consistent; timings are not asserted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from api.cli import app

pytestmark = pytest.mark.timeout(180)


def test_bench_serve_runs_and_writes_json(tmp_path: Path, test_output_dir: Path) -> None:
    out = test_output_dir / "bench-serve-tiny.json"
    result = CliRunner().invoke(
        app,
        ["bench", "serve", "--backbone", "open_clip:tiny:random", "--device", "cpu", "--tasks", "7", "--tenants", "3",
         "--clients", "4", "--seconds", "2", "--baseline-seconds", "1", "--out", str(out)],  # fmt: skip
    )
    assert result.exit_code == 0, result.output
    res: dict[str, Any] = json.loads(out.read_text())
    assert "mixed engine / (c) naive reload per switch" in result.output
    assert res["params"]["tasks_per_scenario"] == 7 and res["params"]["clients"] == 4
    for run in (res["features"]["engine"], res["mixed"]["engine"], res["mixed"]["one_request_one_forward"],
                res["mixed"]["naive_reload_per_switch"]):  # fmt: skip
        assert run["images"] > 0 and run["images_per_s"] > 0
        assert run["errors"] == {}
        assert 0 < run["p50_ms"] <= run["p95_ms"] <= run["p99_ms"]
    assert res["mixed"]["one_request_one_forward"]["mean_batch"] == 1.0
    assert res["mixed"]["naive_reload_per_switch"]["task_switches"] > 0
    assert res["features"]["bare_tower"]["images_per_s"] > 0
    assert sorted(res["mixed"]["one_task_prompted"]["per_method"]) == sorted(res["params"]["mixed_methods"])
    for key, value in res["ratios"].items():
        assert value is not None and value > 0, key
        assert res["targets"][key]["met"] == (value >= res["targets"][key]["min"])
    r = res["ratios"]
    assert r["vs_naive_reload"] == pytest.approx(
        res["mixed"]["engine"]["images_per_s"] / res["mixed"]["naive_reload_per_switch"]["images_per_s"]
    )
