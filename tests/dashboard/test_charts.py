"""The task page's pictures: curve geometry and confusion-matrix shading."""

from __future__ import annotations

from api.admin import charts


def test_training_curve_scales_loss_and_accuracy_to_their_axes() -> None:
    assert charts.training_curve(None) is None and charts.training_curve([]) is None
    history = [{"epoch": e, "loss": 2.0 / e, "val_accuracy": min(1.0, e / 4)} for e in range(1, 6)]
    c = charts.training_curve(list(reversed(history)))  # any order
    assert c is not None and c.epochs == 5
    x0, y0, x1, y1 = c.plot
    loss = [tuple(map(float, p.split(","))) for p in c.loss_points.split()]
    acc = [tuple(map(float, p.split(","))) for p in c.acc_points.split()]
    assert [p[0] for p in loss] == sorted(p[0] for p in loss) and loss[0][0] == x0 and loss[-1][0] == x1
    assert loss[0][1] < loss[-1][1]  # falling loss is drawn going down (larger y)
    assert acc[-1][1] == y0 and acc[-1][1] < acc[0][1]  # accuracy 1.0 at the top
    assert all(y0 <= y <= y1 for _, y in loss + acc)
    assert c.last_loss == 0.4 and c.last_acc == 1.0


def test_training_curve_skips_missing_and_non_finite_values() -> None:
    c = charts.training_curve([
        {"epoch": 1, "loss": float("nan"), "val_accuracy": None},
        {"epoch": 2, "loss": 1.0, "val_accuracy": None},
        {"loss": 3.0},  # no epoch: ignored
    ])
    assert c is not None and c.epochs == 2 and len(c.loss_points.split()) == 1 and c.acc_points == ""
    one = charts.training_curve([{"epoch": 3, "loss": 0.5, "val_accuracy": 0.5}])
    assert one is not None and len(one.loss_points.split()) == 1


def test_confusion_shades_each_row_by_its_share() -> None:
    assert charts.confusion(None, ["a"]) is None and charts.confusion([], []) is None
    cm = charts.confusion([[3, 1], [0, 0]], ["cat", "dog"])
    assert cm is not None and cm.classes == ["cat", "dog"]
    assert cm.rows[0] == [(3, round(9 * 3 / 4)), (1, round(9 / 4))] and cm.rows[1] == [(0, 0), (0, 0)]
    assert (cm.correct, cm.total, cm.row_totals) == (3, 4, [4, 0])
    assert charts.confusion([[1, 0, 0], [0, 1, 0], [0, 0, 1]], ["a"]).classes == ["a", "#1", "#2"]


def _bins(counts: list[int], *, skew: float = 0.0) -> list[dict]:
    """15 equal bins in the evaluation's format: an empty bin has count 0 and null numbers."""
    out = []
    for i, n in enumerate(counts):
        lo, hi = i / 15, (i + 1) / 15
        mid = (lo + hi) / 2
        out.append({
            "lower": lo, "upper": hi, "count": n,
            "confidence": mid if n else None,
            "accuracy": max(0.0, min(1.0, mid + skew)) if n else None,
        })
    return out


def test_reliability_diagram_has_a_bar_per_bin_the_diagonal_and_the_counts() -> None:
    assert charts.reliability(None) is None and charts.reliability([]) is None
    assert charts.reliability([{"lower": "x"}, 3]) is None  # nothing usable
    counts = [0] * 10 + [1, 2, 4, 8, 16]
    rel = charts.reliability(list(reversed(_bins(counts, skew=-0.1))))  # any order
    assert rel is not None and len(rel.bins) == 15
    x0, y0, x1, y1 = rel.plot
    # the diagonal of perfect calibration: from (0, 0) bottom left to (1, 1) top right
    assert rel.diagonal == (x0, y1, x1, y0)
    # bins side by side over the confidence axis, in order, inside the plot
    lefts = [b.x for b in rel.bins]
    assert lefts == sorted(lefts) and rel.bins[0].x >= x0 and rel.bins[-1].x + rel.bins[-1].width <= x1
    assert [b.lower for b in rel.bins] == sorted(b.lower for b in rel.bins)
    # empty bins: no accuracy bar, no gap, a count bar of height 0
    c0, c1 = rel.counts_strip
    for b in rel.bins[:10]:
        assert b.count == 0 and b.acc_y is None and b.conf_y is None and b.gap_top is None and b.count_y == c1
        assert b.title.endswith("no images")
    # counts: the fullest bin fills the strip, the others in proportion
    assert (rel.total, rel.max_count) == (31, 16)
    full = rel.bins[-1]
    assert full.count == 16 and full.count_y == c0
    half = rel.bins[-2]
    assert half.count_y == round(c1 - (c1 - c0) / 2, 1)
    # accuracy 0.1 below confidence: each bar ends below its mean confidence, the gap between
    for b in rel.bins[10:]:
        assert b.acc_y is not None and b.conf_y is not None and b.acc_y > b.conf_y  # lower accuracy: larger y
        assert b.gap_top == b.conf_y and abs(b.gap_height - (b.acc_y - b.conf_y)) < 1e-9
        assert abs((y1 - b.acc_y) / (y1 - y0) - b.accuracy) < 0.01
        assert str(b.count) in b.title
    assert "31 images in 5 of 15 confidence bins" in rel.label and "0.100" in rel.label


def test_reliability_diagram_clamps_and_handles_a_perfect_model() -> None:
    perfect = [{"lower": 0.9, "upper": 1.0, "count": 5, "confidence": 1.0, "accuracy": 1.0},
               {"lower": 0.0, "upper": 0.1, "count": 0, "confidence": None, "accuracy": None}]
    rel = charts.reliability(perfect)
    assert rel is not None and rel.total == 5
    top = rel.bins[-1]
    x0, y0, x1, y1 = rel.plot
    assert top.acc_y == y0 and top.gap_height == 0  # accuracy 1.0 reaches the top, no gap
    wild = charts.reliability([{"lower": -1, "upper": 2, "count": 3, "confidence": 7, "accuracy": float("nan")}])
    assert wild is not None and wild.bins[0].lower == 0.0 and wild.bins[0].upper == 1.0
    assert wild.bins[0].acc_y is None and wild.bins[0].confidence == 1.0  # a missing number draws no bar
    assert charts.reliability([{"lower": 0.5, "upper": 0.6, "count": 0}]).label == "reliability diagram: no images"


def test_confusion_cells_tell_right_from_wrong() -> None:
    cm = charts.confusion([[5, 1, 0], [2, 2, 0], [0, 0, 0]], ["a", "b", "c"])
    assert cm is not None and cm.wrong == 3 and cm.correct == 7
    kinds = [[c.right for c in row] for row in cm.cells]
    assert kinds == [[True, False, False], [False, True, False], [False, False, True]]
    assert cm.cells[0][0].css == f"right lvl-{round(9 * 5 / 6)}" and cm.cells[0][1].css == f"wrong lvl-{round(9 / 6)}"
    assert cm.cells[1][0].css.startswith("wrong ") and cm.cells[1][1].css.startswith("right ")
    assert cm.cells[2][2].css == "right lvl-0" and cm.cells[2][2].share == 0.0  # an empty row
    assert cm.cells[1][0].title.startswith("wrong: 2 image(s) of b predicted as a")
