"""random-patch: fixed-patch's learned p x p patch at a random location (Bahng et al.,
"Exploring Visual Prompts for Adapting Large-Scale Models", 2022; the authors'
``RandomPatchPrompter``).

While training, the patch's top-left corner (row, column) is drawn uniformly from
[0, S - p) each, once per batch (every image of a batch shares it), as the authors' code
does. The authors' code draws at test time too; a served classifier must be deterministic,
so in eval mode (validation and serving) the patch sits at the centre,
((S - p) // 2, (S - p) // 2). Head, template and training defaults as padding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from pydantic import Field

from ..errors import ConfigError
from .fixed_patch import FixedPatchConfig, FixedPatchModule
from .registry import MethodSpec, Trainer, register

if TYPE_CHECKING:
    from ..loading import Backbone


class RandomPatchConfig(FixedPatchConfig):
    __doc__ = FixedPatchConfig.__doc__

    prompt_size: int | None = Field(
        None,
        ge=1,
        le=512,
        description="Patch side p in pixels; must be smaller than the image size. None: 30 at 224 px (the "
        "authors' code's prompt_size), scaled to the backbone's image size. While training the patch's "
        "top-left corner is drawn uniformly from [0, S - p) per axis once per batch (the authors' code). "
        "Deliberate difference: the authors' code also draws at test time; here validation and serving put "
        "the patch at the centre, ((S - p) // 2, (S - p) // 2), so a served classifier is deterministic.",
    )


class RandomPatchModule(FixedPatchModule):
    def __init__(self, backbone: "Backbone", classes: list[str], config: RandomPatchConfig):
        super().__init__(backbone, classes, config)
        # the training locations: seeded by the config, independent of the global RNG
        self.location_rng = torch.Generator().manual_seed(config.seed)

    @classmethod
    def check_backbone(cls, backbone: "Backbone", config: RandomPatchConfig) -> None:
        p, s = config.size_for(backbone.image_size), backbone.image_size
        if p >= s:
            raise ConfigError(f"prompt_size={p} leaves the patch no room to move: it must be smaller than {s}")
        super().check_backbone(backbone, config)

    def serving_location(self) -> tuple[int, int]:
        """(row, column) of the patch in eval mode: the centre."""
        c = (self.image_size - self.prompt_size) // 2
        return c, c

    def pixel_prompt(self, batch: int) -> torch.Tensor:  # (1, 3, S, S)
        if not self.training:
            return self.patch_at(*self.serving_location())
        row, col = torch.randint(0, self.image_size - self.prompt_size, (2,), generator=self.location_rng).tolist()
        return self.patch_at(row, col)


register(
    MethodSpec(
        name="random-patch",
        config_cls=RandomPatchConfig,
        module_cls=RandomPatchModule,
        trainer=Trainer.SGD,
        summary="a learned pixel patch at a random location per training batch, at the centre when classifying",
        smoke_config={"epochs": 2, "prompt_size": 4},
    )
)
