"""vpt-deep: a set of prompt tokens for every layer of the image transformer (VPT-Deep)."""

from __future__ import annotations

from .registry import MethodSpec, Trainer, register
from .vpt import VPTConfig, VPTModule


class VPTDeepConfig(VPTConfig):
    pass


class VPTDeepModule(VPTModule):
    is_deep = True


register(
    MethodSpec(
        name="vpt-deep",
        config_cls=VPTDeepConfig,
        module_cls=VPTDeepModule,
        trainer=Trainer.SGD,
        summary="prompt tokens replaced at the input of every image transformer layer",
        smoke_config={"epochs": 2, "n_tokens": 2},
    )
)
