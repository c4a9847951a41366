"""Geometry for the task page's pictures, computed here and drawn by the template as inline
SVG (no script, no library): the training curve, the confusion matrix's shading (right
cells on one scale, wrong cells on another) and an evaluation's reliability diagram."""

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
class Cell:
    """One confusion-matrix cell: its count, its shade (0..HEAT_LEVELS, the share of its row)
    and whether it counts right answers (the diagonal) or wrong ones."""

    count: int
    level: int
    right: bool
    true: str
    predicted: str
    share: float  # of its row, 0 for an empty row

    @property
    def css(self) -> str:
        """``right lvl-N`` / ``wrong lvl-N``: two colour scales, so that a wrong cell never
        looks like a right one whatever its share."""
        return f"{'right' if self.right else 'wrong'} lvl-{self.level}"

    @property
    def title(self) -> str:
        what = "right" if self.right else "wrong"
        return f"{what}: {self.count} image(s) of {self.true} predicted as {self.predicted} ({100 * self.share:.1f} % of the row)"


@dataclass(frozen=True)
class Confusion:
    classes: list[str]
    rows: list[list[tuple[int, int]]]  # per true class: (count, heat level 0..HEAT_LEVELS)
    row_totals: list[int]
    correct: int
    total: int

    @property
    def cells(self) -> list[list[Cell]]:
        """``rows`` as ``Cell``s (the diagonal right, every other cell wrong)."""
        out = []
        for i, row in enumerate(self.rows):
            n = self.row_totals[i]
            out.append([
                Cell(count=c, level=lvl, right=i == j, true=self.classes[i],
                     predicted=self.classes[j] if j < len(self.classes) else f"#{j}", share=c / n if n else 0.0)
                for j, (c, lvl) in enumerate(row)
            ])
        return out

    @property
    def wrong(self) -> int:
        return self.total - self.correct


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


# --------------------------------------------------------------------------- reliability diagram

REL_WIDTH, REL_HEIGHT = 360, 392
REL_PLOT = (48.0, 12.0, 336.0, 300.0)  # x0, y0, x1, y1 of the square plot (confidence x accuracy)
REL_COUNTS = (344.0, 380.0)  # y0, y1 of the strip of image counts per bin under it


@dataclass(frozen=True)
class ReliabilityBin:
    lower: float
    upper: float
    count: int
    confidence: float | None  # mean confidence of the bin's images (None: empty bin)
    accuracy: float | None  # their accuracy (None: empty bin)
    x: float  # the bin's bar: left edge and width
    width: float
    acc_y: float | None  # top of the accuracy bar (None: empty bin)
    conf_y: float | None  # height of the mean confidence: the gap to the bar is the miscalibration
    count_y: float  # top of the count bar in the strip (== its bottom for 0)

    @property
    def gap_top(self) -> float | None:
        return None if self.acc_y is None or self.conf_y is None else min(self.acc_y, self.conf_y)

    @property
    def gap_height(self) -> float:
        return 0.0 if self.acc_y is None or self.conf_y is None else abs(self.acc_y - self.conf_y)

    @property
    def title(self) -> str:
        span = f"confidence {self.lower:.2f}–{self.upper:.2f}"
        if not self.count:
            return f"{span}: no images"
        conf = "—" if self.confidence is None else f"{self.confidence:.3f}"
        acc = "—" if self.accuracy is None else f"{self.accuracy:.3f}"
        return f"{span}: {self.count} image(s), mean confidence {conf}, accuracy {acc}"


@dataclass(frozen=True)
class Reliability:
    width: int
    height: int
    plot: tuple[float, float, float, float]
    counts_strip: tuple[float, float]
    bins: list[ReliabilityBin]
    diagonal: tuple[float, float, float, float]  # x1, y1, x2, y2: perfect calibration
    ticks: list[tuple[float, float, str]]  # (x on the confidence axis, y on the accuracy axis, label)
    total: int
    max_count: int

    @property
    def label(self) -> str:
        """What the picture says, for ``aria-label``."""
        used = [b for b in self.bins if b.count and b.accuracy is not None and b.confidence is not None]
        if not used:
            return "reliability diagram: no images"
        worst = max(used, key=lambda b: abs(b.accuracy - b.confidence))  # type: ignore[operator]
        gap = abs(worst.accuracy - worst.confidence)  # type: ignore[operator]
        return (f"reliability diagram of {self.total} images in {len(used)} of {len(self.bins)} confidence bins; "
                f"largest gap between accuracy and confidence {gap:.3f} "
                f"at confidence {worst.lower:.2f}–{worst.upper:.2f}")


def _fraction(v: Any) -> float | None:
    f = _num(v)
    return None if f is None else min(1.0, max(0.0, f))


def reliability(bins: Any) -> Reliability | None:
    """Accuracy per confidence bin (bars) against the diagonal of perfect calibration, the gap
    between each bar and its bin's mean confidence marked, and the number of images per bin in
    a strip underneath; None without bins. ``bins``: an evaluation's ``reliability``, each
    ``{"lower", "upper", "confidence", "accuracy", "count"}`` (an empty bin: count 0 and null
    confidence and accuracy)."""
    rows = [b for b in (bins if isinstance(bins, list) else []) if isinstance(b, dict)]
    parsed = []
    for b in rows:
        lo, hi = _fraction(b.get("lower")), _fraction(b.get("upper"))
        if lo is None or hi is None or hi < lo:
            continue
        count = b.get("count")
        n = int(count) if isinstance(count, (int, float)) and not isinstance(count, bool) and count > 0 else 0
        conf, acc = _fraction(b.get("confidence")), _fraction(b.get("accuracy"))
        if not n:
            conf = acc = None
        parsed.append((lo, hi, n, conf, acc))
    if not parsed:
        return None
    parsed.sort(key=lambda r: r[0])
    x0, y0, x1, y1 = REL_PLOT
    c0, c1 = REL_COUNTS
    max_count = max(r[2] for r in parsed)

    def x(v: float) -> float:
        return round(x0 + v * (x1 - x0), 1)

    def y(v: float) -> float:
        return round(y1 - v * (y1 - y0), 1)

    out = []
    for lo, hi, n, conf, acc in parsed:
        left, right = x(lo), x(hi)
        inset = 1.0 if right - left > 3 else 0.0
        count_y = round(c1 - (n / max_count) * (c1 - c0), 1) if max_count else c1
        out.append(ReliabilityBin(
            lower=lo, upper=hi, count=n, confidence=conf, accuracy=acc,
            x=round(left + inset, 1), width=round(max(right - left - 2 * inset, 0.5), 1),
            acc_y=None if acc is None else y(acc), conf_y=None if conf is None else y(conf), count_y=count_y,
        ))
    return Reliability(
        width=REL_WIDTH,
        height=REL_HEIGHT,
        plot=REL_PLOT,
        counts_strip=REL_COUNTS,
        bins=out,
        diagonal=(x0, y1, x1, y0),
        ticks=[(x(f), y(f), f"{f:.1f}") for f in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)],
        total=sum(r[2] for r in parsed),
        max_count=max_count,
    )
