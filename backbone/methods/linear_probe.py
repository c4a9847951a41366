"""linear-probe: multinomial logistic regression on frozen, L2-normalised image
features, the L2 strength chosen on the validation split (the CLIP and CoOp baseline).

Fitted with full-batch L-BFGS on cached features for every value of ``l2_grid``
(strongest first, each fit warm-starting the next); the value with the best validation
accuracy is kept (ties: the lower validation cross-entropy, then the stronger regularisation).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from ..towers import ImageFeatures
from .base import MethodConfig, PromptModule, search_field
from .registry import MethodSpec, Trainer, register

if TYPE_CHECKING:
    from ..loading import Backbone

MAX_L2 = 1e6  # far above any useful strength on L2-normalised features


class LinearProbeConfig(MethodConfig):
    l2_grid: list[Annotated[float, Field(ge=0.0, le=MAX_L2)]] = Field(
        default_factory=lambda: [10.0 ** e for e in range(1, -7, -1)],
        min_length=1,
        max_length=64,
        description="L2 strengths to sweep (loss = mean cross-entropy + l2/2 * ||W||^2); the best on the "
        "validation split is kept. Default 1e1 .. 1e-6; each value 0 <= l2 <= 1e6.",
    )
    l2_without_val: float = Field(
        1e-3, ge=0.0, le=MAX_L2, description="L2 strength used when there is no validation split (0 .. 1e6)."
    )
    max_iter: int = Field(300, ge=1, le=10_000, description="L-BFGS iterations per fit.")
    search: bool = search_field()

    @field_validator("l2_grid")
    @classmethod
    def _non_negative(cls, v: list[float]) -> list[float]:
        if any(x < 0 for x in v):
            raise ValueError("l2_grid values must be >= 0")
        return sorted(v, reverse=True)

    def schedule_epochs(self, shots: int) -> int:
        return len(self.l2_grid)


class LinearProbeModule(PromptModule):
    cache_features = True

    def __init__(self, backbone: "Backbone", classes: list[str], config: LinearProbeConfig):
        super().__init__(backbone, classes, config)
        self.linear = nn.Linear(backbone.vision.embed_dim, len(classes))
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def head(self, feats: ImageFeatures) -> torch.Tensor:  # -> (B, C)
        return self.linear(F.normalize(feats.embeds.float(), dim=-1))

    def fit(
        self, x: torch.Tensor, y: torch.Tensor, l2: float, max_iter: int
    ) -> float:
        """One L-BFGS fit from the current weights. x (N, E) normalised float32, y (N,). Returns the loss."""
        opt = torch.optim.LBFGS(
            self.linear.parameters(), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
            tolerance_grad=1e-7, tolerance_change=1e-10, history_size=20,
        )

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(self.linear(x), y) + 0.5 * l2 * self.linear.weight.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            return float(F.cross_entropy(self.linear(x), y) + 0.5 * l2 * self.linear.weight.pow(2).sum())


register(
    MethodSpec(
        name="linear-probe",
        config_cls=LinearProbeConfig,
        module_cls=LinearProbeModule,
        trainer=Trainer.LBFGS,
        summary="logistic regression on frozen image features",
        smoke_config={"l2_grid": [1.0, 0.01], "max_iter": 50},
    )
)
