"""Geometry for the task page's pictures, computed here and drawn by the template as inline
SVG (no script, no library): the training curve and the confusion matrix's shading."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

WIDTH, HEIGHT = 640, 240
PAD_LEFT, PAD_RIGHT, PAD_TOP, PAD_BOTTOM = 48, 48, 16, 32
HEAT_LEVELS = 9


@dataclass(frozen=True)
class Curve:
    width: int
    height: int
    plot: tuple[float, float, float, float]  # x0, y0, x1, y1 of the plot area
    loss_points: str  # "x,y x,y ..." for <polyline>
    acc_points: str
    loss_dots: list[tuple[float, float]]
    acc_dots: list[tuple[float, float]]
    x_ticks: list[tuple[float, str]]
    loss_ticks: list[tuple[float, str]]  # left axis
    acc_ticks: list[tuple[float, str]]  # right axis, 0..1
    epochs: int
    last_loss: float | None
    last_acc: float | None


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def training_curve(history: list[dict[str, Any]] | None) -> Curve | None:
    """Loss (left axis, 0..max) and validation accuracy (right axis, 0..1) per epoch, or
    None when there is no history yet."""
    rows = [h for h in (history or []) if isinstance(h, dict) and _num(h.get("epoch")) is not None]
    if not rows:
        return None
    rows.sort(key=lambda h: h["epoch"])
    x0, y0, x1, y1 = PAD_LEFT, PAD_TOP, WIDTH - PAD_RIGHT, HEIGHT - PAD_BOTTOM
    e_min, e_max = float(rows[0]["epoch"]), float(rows[-1]["epoch"])
    span = (e_max - e_min) or 1.0
    losses = [_num(h.get("loss")) for h in rows]
    accs = [_num(h.get("val_accuracy")) for h in rows]
    l_max = max([v for v in losses if v is not None] or [1.0]) or 1.0
    l_max = _nice_ceiling(l_max)

    def x(e: float) -> float:
        return round(x0 + (e - e_min) / span * (x1 - x0) if e_max > e_min else (x0 + x1) / 2, 1)

    def y(v: float, top: float) -> float:
        return round(y1 - max(0.0, min(v / top, 1.0)) * (y1 - y0), 1)

    loss_dots = [(x(float(h["epoch"])), y(v, l_max)) for h, v in zip(rows, losses) if v is not None]
    acc_dots = [(x(float(h["epoch"])), y(v, 1.0)) for h, v in zip(rows, accs) if v is not None]
    n_ticks = min(len(rows), 6)
    step = max(1, math.ceil((e_max - e_min) / max(n_ticks - 1, 1))) if e_max > e_min else 1
    x_ticks = []
    e = e_min
    while e <= e_max + 1e-9:
        x_ticks.append((x(e), str(int(e))))
        e += step
    return Curve(
        width=WIDTH,
        height=HEIGHT,
        plot=(x0, y0, x1, y1),
        loss_points=" ".join(f"{a},{b}" for a, b in loss_dots),
        acc_points=" ".join(f"{a},{b}" for a, b in acc_dots),
        loss_dots=loss_dots if len(loss_dots) <= 60 else [],
        acc_dots=acc_dots if len(acc_dots) <= 60 else [],
        x_ticks=x_ticks,
        loss_ticks=[(y(l_max * f, l_max), _fmt(l_max * f)) for f in (0, 0.25, 0.5, 0.75, 1.0)],
        acc_ticks=[(y(f, 1.0), f"{f:.2f}") for f in (0, 0.25, 0.5, 0.75, 1.0)],
        epochs=len(rows),
        last_loss=next((v for v in reversed(losses) if v is not None), None),
        last_acc=next((v for v in reversed(accs) if v is not None), None),
    )


def _nice_ceiling(v: float) -> float:
    if v <= 0:
        return 1.0
    mag = 10 ** math.floor(math.log10(v))
    for m in (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10):
        if v <= m * mag:
            return m * mag
    return 10 * mag


def _fmt(v: float) -> str:
    return f"{v:.3g}"


@dataclass(frozen=True)
class Confusion:
    classes: list[str]
    rows: list[list[tuple[int, int]]]  # per true class: (count, heat level 0..HEAT_LEVELS)
    row_totals: list[int]
    correct: int
    total: int


def confusion(matrix: list[list[int]] | None, classes: list[str]) -> Confusion | None:
    """Counts with a shading level per cell (relative to its row: the share of that class's
    validation images predicted as the column), or None without a matrix."""
    if not matrix or not all(isinstance(r, list) for r in matrix):
        return None
    n = len(matrix)
    names = [str(c) for c in classes[:n]] + [f"#{i}" for i in range(len(classes), n)]
    rows, totals = [], []
    correct = total = 0
    for i, r in enumerate(matrix):
        counts = [int(v) if isinstance(v, (int, float)) else 0 for v in r]
        s = sum(counts)
        totals.append(s)
        total += s
        correct += counts[i] if i < len(counts) else 0
        rows.append([(c, round(HEAT_LEVELS * c / s) if s else 0) for c in counts])
    return Confusion(classes=names, rows=rows, row_totals=totals, correct=correct, total=total)
