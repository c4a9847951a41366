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
