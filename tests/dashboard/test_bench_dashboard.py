"""``promptstore bench dashboard`` runs end to end on a small index and writes its JSON
(timings are measured, never asserted)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from typer.testing import CliRunner

from api.cli import app


def test_bench_dashboard_command_prints_a_table_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "dashboard.json"
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        result = CliRunner().invoke(
            app, ["bench", "dashboard", "--tasks", "40", "--tenants", "3", "--epochs", "5", "--classes", "3",
                  "--repeat", "2", "--out", str(out)],
        )
    finally:  # the command set up logging on the runner's stderr, which is closed now
        root.handlers[:], root.level = handlers, level
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["tasks"] == 40 and report["tenants"] == 3 and report["database"] == "sqlite"
    pages = {r["page"]: r for r in report["results"]}
    assert {"overview", "tasks (first page)", "task detail", "tenants", "feed: overview"} <= set(pages)
    for r in report["results"]:
        assert r["server_ms_p50"] > 0 and r["server_ms_max"] >= r["server_ms_p50"] and r["bytes"] > 0
        assert r["page"] in result.output
    assert f"wrote {out}" in result.output
