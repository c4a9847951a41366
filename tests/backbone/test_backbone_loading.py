"""Loading: spec grammar, freezing, fingerprints, real-weight files, the token-level
re-implementations against the library's own forward."""

from __future__ import annotations

import time

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from backbone import BackboneError, load_backbone, parse_spec
from backbone import loading as loading_mod

from bbtest_helpers import TINY


def test_parse_spec_grammar(tmp_path):
    p = parse_spec("open_clip:ViT-B-32:random")
    assert (p.library, p.arch, p.kind, p.seed) == ("open_clip", "ViT-B-32", "random", 0)
    assert p.resolved == "open_clip:ViT-B-32:random@0"
    assert parse_spec("timm:vit_tiny_patch16_224:random@7").seed == 7
    assert parse_spec("open_clip:ViT-B-32:openai").kind == "tag"
    ckpt = tmp_path / "w.safetensors"
    ckpt.write_bytes(b"x")
    p = parse_spec(f"open_clip:tiny:{ckpt}")
    assert (p.kind, p.path) == ("path", str(ckpt))


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("ViT-B-32", "LIBRARY:ARCH:WEIGHTS"),
        ("keras:ViT-B-32:random", "library 'keras'"),
        ("open_clip:ViT-B-32:random@x", "not an integer"),
        ("open_clip:ViT-B-32:/nope/w.safetensors", "does not exist"),
        ("open_clip:NoSuchArch:random", "unknown open_clip architecture 'NoSuchArch'"),
        ("open_clip:tiny:no-such-tag", "unknown pretrained tag 'no-such-tag'"),
        ("timm:no_such_vit:random", "unknown timm architecture"),
    ],
)
def test_bad_specs_say_what_is_wrong(spec, needle):
    with pytest.raises(BackboneError, match=needle):
        load_backbone(spec, device="cpu")


def test_tiny_loads_deterministically_and_is_frozen(tiny):
    bb = load_backbone(TINY, device="cpu")
    assert bb.fingerprint == tiny.fingerprint  # deterministic random init
    assert bb.spec == "open_clip:tiny:random@0"
    assert bb.fingerprint.startswith(bb.spec + "#")
    assert bb.weights == "random" and bb.library == "open_clip" and bb.has_text
    assert bb.dtype == torch.float32 and bb.device.type == "cpu" and bb.image_size == 32
    assert all(not p.requires_grad for p in bb.model.parameters())
    assert not bb.model.training
    bb.model.train()  # the frozen model refuses to leave eval mode
    assert not any(m.training for m in bb.model.modules())
    info = bb.info()
    assert set(info) == {"id", "fingerprint", "weights", "device", "library"}
    assert info["id"] == bb.spec and info["weights"] == "random"


def test_other_seed_other_fingerprint(tiny, tiny_other):
    assert tiny.fingerprint != tiny_other.fingerprint
    assert tiny_other.spec == "open_clip:tiny:random@1"


def test_preprocess_matches_size(tiny):
    img = Image.new("RGB", (50, 40), (255, 0, 0))
    x = tiny.preprocess(img)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    gray = tiny.preprocess(Image.new("L", (64, 64), 128))
    assert gray.shape == (3, 32, 32)
    # normalised with CLIP's mean/std: a red image is bright in R, dark in G/B
    assert x[0].mean() > 1.5 and x[1].mean() < -1.5


@pytest.mark.parametrize("spec", ["open_clip:tiny:random", "timm:vit_tiny_patch16_224:random"])
def test_fast_preprocess_is_the_library_transform_bit_for_bit(spec):
    import numpy as np

    bb = load_backbone(spec, "cpu")
    assert bb._fast_preprocess is not None, "open_clip's and timm's eval transforms take the numpy path"
    rng = np.random.default_rng(1)
    images = [
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)) for h, w in [(31, 47), (300, 200), (224, 224)]
    ]
    images += [
        Image.fromarray(rng.integers(0, 256, size=(90, 60), dtype=np.uint8)),  # L
        Image.fromarray(rng.integers(0, 256, size=(64, 80, 4), dtype=np.uint8), "RGBA"),
        Image.new("P", (40, 40), 7),
    ]
    for img in images:
        want = bb._preprocess_fn(img.convert("RGB")).to(torch.float32)
        got = bb.preprocess(img)
        assert got.dtype == want.dtype and got.shape == want.shape and got.is_contiguous()
        assert torch.equal(got, want), img
    batch = bb.preprocess_batch(images)
    assert batch.shape == (len(images), 3, bb.image_size, bb.image_size) and batch.dtype == torch.float32
    assert torch.equal(batch, torch.stack([bb._preprocess_fn(i.convert("RGB")) for i in images]))


def test_fast_preprocess_declines_other_pipelines():
    from torchvision import transforms as T

    from backbone.loading import FastPreprocess

    assert FastPreprocess.of(T.Compose([T.Resize(8), T.ToTensor()])) is None  # no Normalize
    assert FastPreprocess.of(T.Compose([T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3), T.CenterCrop(4)])) is None
    assert FastPreprocess.of(T.Compose([T.Grayscale(3), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])) is None
    assert FastPreprocess.of(lambda img: img) is None
    ok = FastPreprocess.of(T.Compose([T.Resize(8), T.CenterCrop(8), T.ToTensor(), T.Normalize([0.1, 0.2, 0.3], [0.4, 0.5, 0.6])]))
    assert ok is not None


def test_image_reimplementation_equals_encode_image(tiny):
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = tiny.model.encode_image(x)
        ours = tiny.encode_images(x)
    assert torch.equal(ours.embeds, ref)
    assert ours.pooled.shape == (5, tiny.vision.pooled_dim)


def test_text_reimplementation_equals_encode_text(tiny):
    tokens = tiny.tokenize(["a photo of a cat.", "dog", "a rather longer sentence about a red square"])
    with torch.no_grad():
        ref = tiny.model.encode_text(tokens)
        exact = tiny.text.encode(tokens, truncate=False)
        short = tiny.text.encode(tokens)  # truncated after the last EOT (causal mask)
    assert torch.equal(exact, ref)
    assert (short - ref).abs().max() < 1e-5


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".bin"])
def test_checkpoint_files_load_through_open_clip(tmp_path, tiny, suffix):
    other = load_backbone("open_clip:tiny:random@5", device="cpu")
    sd = {k: v.clone().contiguous() for k, v in other.model.state_dict().items()}
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, str(path))
    bb = load_backbone(f"open_clip:tiny:{path}", device="cpu")
    assert bb.weights == "real" and bb.spec == f"open_clip:tiny:{path}"
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(bb.encode_images(x).embeds, other.encode_images(x).embeds)
        assert not torch.equal(bb.encode_images(x).embeds, tiny.encode_images(x).embeds)
    # the fingerprint's hash is the hash of the weights, whatever file carried them
    assert bb.fingerprint.split("#")[1] == other.fingerprint.split("#")[1]
    assert bb.fingerprint.split("#")[1] != tiny.fingerprint.split("#")[1]


def test_fingerprint_depends_on_file_contents(tmp_path):
    a = load_backbone("open_clip:tiny:random@5", device="cpu")
    sd = {k: v.clone().contiguous() for k, v in a.model.state_dict().items()}
    path = tmp_path / "w.safetensors"
    save_file(sd, str(path))
    fp1 = load_backbone(f"open_clip:tiny:{path}", device="cpu").fingerprint
    sd["visual.proj"] = sd["visual.proj"] + 1.0
    time.sleep(0.01)
    save_file(sd, str(path))
    fp2 = load_backbone(f"open_clip:tiny:{path}", device="cpu").fingerprint
    assert fp1 != fp2


def test_pickled_objects_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, str(path))
    with pytest.raises(BackboneError, match="could not load weights"):
        load_backbone(f"open_clip:tiny:{path}", device="cpu")


def test_wrong_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"foo": torch.zeros(2)}, str(path))
    with pytest.raises(BackboneError, match=r"could not load weights open_clip:tiny:.*w\.safetensors"):
        load_backbone(f"open_clip:tiny:{path}", device="cpu")


def test_auto_falls_back_to_random_and_says_so(monkeypatch, caplog):
    monkeypatch.setattr(loading_mod, "_openclip_cached_file", lambda arch, tag: None)
    monkeypatch.setattr(loading_mod, "_network_reachable", lambda timeout=3.0: False)
    with caplog.at_level("WARNING", logger="backbone.loading"):
        bb = load_backbone("auto", device="cpu")
    assert bb.spec == "open_clip:ViT-B-32:random@0" and bb.weights == "random"
    assert bb.notice and "RANDOM" in bb.notice
    assert any("RANDOM" in r.getMessage() for r in caplog.records)


def test_network_probe_is_bounded(monkeypatch):
    # bounded by construction: every connect gets the timeout, and the caller waits on the
    # probe thread for at most the sum of those timeouts (checked as arguments, not seconds)
    connects: list[float] = []
    joins: list[float] = []

    def refuse(address, timeout=None):
        connects.append(timeout)
        raise OSError("unreachable")

    real_join = loading_mod.threading.Thread.join

    def join(self, timeout=None):
        joins.append(timeout)
        return real_join(self, timeout)

    monkeypatch.setattr(loading_mod.socket, "create_connection", refuse)
    monkeypatch.setattr(loading_mod.threading.Thread, "join", join)
    assert loading_mod._network_reachable(timeout=0.5) is False
    assert connects == [0.5] * len(loading_mod._PROBE_HOSTS)
    assert joins and joins[0] is not None and joins[0] <= 0.5 * len(loading_mod._PROBE_HOSTS) + 0.5


def test_bad_device():
    with pytest.raises(BackboneError, match="device"):
        load_backbone(TINY, device="tpu:0")


def test_timm_vit_loads_and_matches_its_forward(tmp_path):
    bb = load_backbone("timm:vit_tiny_patch16_224:random@0", device="cpu")
    assert bb.library == "timm" and not bb.has_text and bb.image_size == 224
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = bb.model.forward_head(bb.model.forward_features(x), pre_logits=True)
        assert torch.equal(bb.encode_images(x).pooled, ref)
    # a local checkpoint through timm's own loader
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in bb.model.state_dict().items()}, str(path))
    bb2 = load_backbone(f"timm:vit_tiny_patch16_224:{path}", device="cpu")
    assert bb2.fingerprint.split("#")[1] == bb.fingerprint.split("#")[1]
    with torch.no_grad():
        assert torch.equal(bb2.encode_images(x).pooled, ref)
