"""Promptstore backbone: one frozen CLIP/ViT model and the prompt methods that adapt
it without touching its weights. Tensors only: no web, database or queue imports.

    bb = load_backbone("open_clip:tiny:random")
    result = tune(bb, "coop", classes, images, labels, {"epochs": 5})
    best = tune(bb, "auto", classes, images, labels, {"budget_s": 600})  # a prompt of the method that won
    data = result.prompt.to_bytes()
    resident = prepare_resident(bb, load_prompt(data, bb))
    logits = forward_mixed(bb, [resident], images, torch.zeros(len(images), dtype=torch.long))
"""

from .artifacts import FORMAT_VERSION, TrainedPrompt, load_prompt, read_prompt_metadata
from .errors import BackboneError, Cancelled, ConfigError, PromptFormatError, PromptMismatch
from .loading import Backbone, load_backbone, parse_spec
from .methods import describe_config, method_names, task_method_names, validate_config
from .serving import ResidentPrompt, forward_mixed, prepare_resident
from .search import tune
from .tuning import Progress, TuneResult

__all__ = [
    "Backbone",
    "load_backbone",
    "parse_spec",
    "BackboneError",
    "method_names",
    "task_method_names",
    "validate_config",
    "describe_config",
    "ConfigError",
    "tune",
    "TuneResult",
    "Progress",
    "Cancelled",
    "TrainedPrompt",
    "load_prompt",
    "read_prompt_metadata",
    "PromptMismatch",
    "PromptFormatError",
    "FORMAT_VERSION",
    "ResidentPrompt",
    "forward_mixed",
    "prepare_resident",
]
