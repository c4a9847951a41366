"""vpt-shallow: one set of prompt tokens at the input of the first layer (VPT-Shallow)."""

from __future__ import annotations

from .registry import MethodSpec, Trainer, register
from .vpt import VPTConfig, VPTModule


class VPTShallowConfig(VPTConfig):
    pass


class VPTShallowModule(VPTModule):
    is_deep = False


register(
    MethodSpec(
        name="vpt-shallow",
        config_cls=VPTShallowConfig,
        module_cls=VPTShallowModule,
        trainer=Trainer.SGD,
        summary="prompt tokens after [CLS] at the input of the image transformer",
        smoke_config={"epochs": 2, "n_tokens": 2},
    )
)
