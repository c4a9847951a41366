"""tests/deploy: the offline manifest checks and the multi-process scale test.

The ``scale`` marker selects the scale test (``pytest -m scale``; ``-m 'not scale'``
leaves it out). When a test that uses the ``scale_cluster`` fixture fails, the tails of
every process log are attached to its report.
"""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "scale: the scale-out test: two API processes and two Celery workers sharing Postgres, Redis and S3",
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # noqa: ANN201 - hook wrapper
    outcome = yield
    report = outcome.get_result()
    cluster = getattr(item, "funcargs", {}).get("scale_cluster")
    if report.failed and cluster is not None:
        report.sections.append(("scale-out process logs (tails)", cluster.log_tails()))
