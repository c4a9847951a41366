"""fixed-patch and random-patch against the authors' prompters (Bahng et al., visual_prompting
``FixedPatchPrompter`` / ``RandomPatchPrompter``), written out here: prompt = zeros(1, 3, S, S)
with ``patch`` (1, 3, p, p) written at (x, y), added to the preprocessed image."""

from __future__ import annotations

import pytest
import torch

from backbone import forward_mixed, prepare_resident
from backbone.methods import get_method, parse_config
from backbone.methods.base import PIXELS
from backbone.tuning import build_module, prompt_of

NAMES = ["sea_lion", "aardvark", "T-shirt"]
S = 32  # tiny's image size


def _module(bb, method, config, classes=NAMES):
    return build_module(bb, get_method(method), classes, parse_config(method, config))


def _reference_prompt(patch: torch.Tensor, x: int, y: int, size: int = S) -> torch.Tensor:
    p = patch.shape[-1]
    prompt = torch.zeros([1, 3, size, size])
    prompt[:, :, x:x + p, y:y + p] = patch
    return prompt


def _images(n=5, seed=0):
    return torch.randn(n, 3, S, S, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", ["fixed-patch", "random-patch"])
def test_patch_parameter_init_and_default_size(tiny, method):
    m = _module(tiny, method, {"prompt_size": 5})
    assert [n for n, _ in m.named_parameters()][0] == "patch" and m.patch.shape == (1, 3, 5, 5)
    assert m.image_pass() == PIXELS
    # default p: the authors' 30 at 224 px, scaled like padding's frame
    assert _module(tiny, method, {}).prompt_size == round(30 * S / 224)


def test_fixed_patch_equals_reference_at_top_left(tiny):
    m = _module(tiny, "fixed-patch", {"prompt_size": 6})
    ref = _reference_prompt(m.patch.detach(), 0, 0)
    for mode in (m.train, m.eval):
        mode()
        assert torch.equal(m.pixel_prompt(4).detach(), ref)
    x = _images()
    m.eval()
    with torch.no_grad():
        ours = m(images=x)
        want = m.head(tiny.encode_images(x + ref))
    assert torch.equal(ours, want)


@pytest.mark.parametrize("method", ["fixed-patch", "random-patch"])
def test_zero_patch_equals_plain_forward(tiny, method):
    m = _module(tiny, method, {"head": "clip"})
    with torch.no_grad():
        m.patch.zero_()
    x = _images()
    for mode in (m.train, m.eval):
        mode()
        with torch.no_grad():
            assert torch.equal(m(images=x), m.head(tiny.encode_images(x)))


def test_random_patch_serves_at_the_centre_deterministically(tiny):
    m = _module(tiny, "random-patch", {"prompt_size": 6})
    m.eval()
    c = (S - 6) // 2
    ref = _reference_prompt(m.patch.detach(), c, c)
    assert m.serving_location() == (c, c)
    assert all(torch.equal(m.pixel_prompt(3).detach(), ref) for _ in range(5))
    x = _images()
    resident = prepare_resident(tiny, prompt_of(tiny, "random-patch", m))
    a = resident.forward(x)
    assert torch.equal(a, resident.forward(x))
    with torch.no_grad():
        want = m.head(tiny.encode_images(x + ref)).float()
    assert torch.allclose(a, want, atol=1e-6)


def test_random_patch_draws_one_location_per_training_batch(tiny):
    m = _module(tiny, "random-patch", {"prompt_size": 6, "seed": 3})
    m.train()
    p = 6

    def location(prompt: torch.Tensor) -> tuple[int, int]:
        nz = prompt[0, 0].ne(0).nonzero()
        return int(nz[:, 0].min()), int(nz[:, 1].min())

    with torch.no_grad():
        m.patch.copy_(torch.rand(1, 3, p, p) + 1.0)  # no zero entry: the support is the patch
    drawn = []
    for _ in range(30):
        prompt = m.pixel_prompt(8).detach()
        assert prompt.shape == (1, 3, S, S)  # the whole batch shares it
        x, y = location(prompt)
        assert 0 <= x < S - p and 0 <= y < S - p
        assert torch.equal(prompt, _reference_prompt(m.patch.detach(), x, y))
        drawn.append((x, y))
    assert len(set(drawn)) > 10  # it moves between batches
    # seeded by the config: a rebuilt module draws the same sequence
    again = _module(tiny, "random-patch", {"prompt_size": 6, "seed": 3})
    again.train()
    with torch.no_grad():
        again.patch.copy_(m.patch)
    assert [location(again.pixel_prompt(8).detach()) for _ in range(30)] == drawn
    # and the gradient reaches the patch through the drawn location
    m.zero_grad()
    m.pixel_prompt(2).sum().backward()
    assert torch.equal(m.patch.grad, torch.ones_like(m.patch))


def test_random_patch_needs_room_to_move(tiny):
    from backbone import ConfigError

    with pytest.raises(ConfigError, match="smaller than 32"):
        _module(tiny, "random-patch", {"prompt_size": 32})
    assert _module(tiny, "fixed-patch", {"prompt_size": 32}).pixel_prompt(1).shape == (1, 3, S, S)


def test_patches_and_padding_mix_with_every_pass(tiny):
    """The mixed forward routes pixel-prompt tasks by their image pass: each image's logits
    equal its task alone."""
    tasks = [
        ("fixed-patch", {"prompt_size": 5}), ("random-patch", {"prompt_size": 5}), ("padding", {"pad": 3}),
        ("vpt-deep", {"n_tokens": 2}), ("cocoop", {}), ("zeroshot", {}),
    ]
    residents = []
    for i, (method, cfg) in enumerate(tasks):
        torch.manual_seed(i)
        m = _module(tiny, method, cfg)
        with torch.no_grad():
            for prm in m.parameters():
                prm.add_(0.05 * torch.randn_like(prm))
        residents.append(prepare_resident(tiny, prompt_of(tiny, method, m)))
    x = _images(12, seed=4)
    owner = torch.tensor([0, 1, 2, 3, 4, 5, 1, 0, 2, 4, 3, 1])
    mixed = forward_mixed(tiny, residents, x, owner)
    for i, r in enumerate(owner.tolist()):
        alone = residents[r].forward(x[i:i + 1])[0]
        assert (mixed[i] - alone).abs().max() < 1e-4, tasks[r][0]


def test_class_names_and_template_as_padding(tiny):
    spec = get_method("fixed-patch")
    prompts = spec.module_cls.text_prompts(NAMES, parse_config("fixed-patch", {}), tiny.text_tokens)
    assert prompts == [["This is a photo of a sea lion"], ["This is a photo of a aardvark"], ["This is a photo of a t shirt"]]
    pad = get_method("padding").config_cls.model_fields
    for method in ("fixed-patch", "random-patch"):
        fields = get_method(method).config_cls.model_fields
        for key in ("epochs", "lr", "weight_decay", "warmup", "head", "template"):
            assert fields[key].default == pad[key].default, (method, key)
    assert "centre" in get_method("random-patch").config_cls.model_fields["prompt_size"].description
