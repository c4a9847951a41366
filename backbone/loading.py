"""Loading the frozen backbone from a spec string (grammar in docs/backbones.md).

    LIBRARY:ARCH:WEIGHTS   LIBRARY in {open_clip, timm}
    WEIGHTS = pretrained tag | path to .safetensors/.pt/.pth/.bin | random | random@SEED
    auto    = open_clip:ViT-B-32:openai when cached or fetchable, else open_clip:ViT-B-32:random@0

The model is frozen here and only here (``_freeze``). Weights are hashed once per
process and file (``_weights_digest``) to form the fingerprint.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from .errors import BackboneError
from .towers import ImageFeatures, OpenClipVision, TextAdapter, TimmVision, TokenPrompts, VisionAdapter

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image


log = logging.getLogger(__name__)

LIBRARIES = ("open_clip", "timm")
AUTO_SPEC = "open_clip:ViT-B-32:openai"
AUTO_FALLBACK_SPEC = "open_clip:ViT-B-32:random@0"
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
FINGERPRINT_HEX = 16
_PROBE_HOSTS = (("huggingface.co", 443), ("openaipublic.azureedge.net", 443))
_PROBE_TIMEOUT_S = 3.0

_CONFIG_DIR = Path(__file__).parent / "model_configs"
_registered = False
_register_lock = threading.Lock()


def register_model_configs() -> None:
    """Register the project's open_clip configs (``tiny``) once, through open_clip's registry."""
    global _registered
    with _register_lock:
        if _registered:
            return
        import open_clip

        open_clip.add_model_config(_CONFIG_DIR)
        _registered = True


@dataclass(frozen=True)
class ParsedSpec:
    library: str
    arch: str
    kind: str  # "random" | "tag" | "path"
    seed: int = 0
    tag: str | None = None
    path: str | None = None

    @property
    def resolved(self) -> str:
        if self.kind == "random":
            return f"{self.library}:{self.arch}:random@{self.seed}"
        return f"{self.library}:{self.arch}:{self.tag if self.kind == 'tag' else self.path}"


def parse_spec(spec: str) -> ParsedSpec:
    """Parse ``LIBRARY:ARCH:WEIGHTS`` (not ``auto``); raise BackboneError naming the problem."""
    parts = spec.split(":", 2)
    if len(parts) != 3 or not all(parts):
        raise BackboneError(
            f"backbone spec {spec!r} is not LIBRARY:ARCH:WEIGHTS (e.g. open_clip:ViT-B-32:openai, "
            "open_clip:tiny:random, timm:vit_base_patch16_224:augreg_in21k) or 'auto'"
        )
    library, arch, weights = parts
    if library not in LIBRARIES:
        raise BackboneError(f"backbone library {library!r} is not supported; use one of {list(LIBRARIES)}")
    if weights == "random" or weights.startswith("random@"):
        seed_text = weights.partition("@")[2] or "0"
        try:
            seed = int(seed_text)
        except ValueError:
            raise BackboneError(f"random seed {seed_text!r} in {spec!r} is not an integer (random@SEED)") from None
        return ParsedSpec(library, arch, "random", seed=seed)
    looks_like_path = weights.endswith(CHECKPOINT_SUFFIXES) or os.sep in weights or os.path.exists(weights)
    if looks_like_path:
        if not os.path.isfile(weights):
            raise BackboneError(f"checkpoint file {weights!r} does not exist")
        if not weights.endswith(CHECKPOINT_SUFFIXES):
            raise BackboneError(f"checkpoint {weights!r} must end with one of {list(CHECKPOINT_SUFFIXES)}")
        return ParsedSpec(library, arch, "path", path=weights)
    return ParsedSpec(library, arch, "tag", tag=weights)


# ---------------------------------------------------------------- hashing

_DIGEST_CACHE: dict[tuple, str] = {}
_DIGEST_LOCK = threading.Lock()


def state_dict_sha256(model: nn.Module) -> str:
    """sha256 over (name, dtype, shape, bytes) of every state-dict tensor, sorted by name."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _weights_digest(parsed: ParsedSpec, model: nn.Module, source_file: str | None) -> str:
    key: tuple = (parsed.resolved,)
    if source_file:
        st = os.stat(source_file)
        key += (os.path.realpath(source_file), st.st_size, st.st_mtime_ns)
    with _DIGEST_LOCK:
        if key in _DIGEST_CACHE:
            return _DIGEST_CACHE[key]
    digest = state_dict_sha256(model)
    with _DIGEST_LOCK:
        _DIGEST_CACHE[key] = digest
    return digest


# ---------------------------------------------------------------- the Backbone


class Backbone:
    """One frozen CLIP/ViT model and the token-level access the prompt methods need.

    Attributes per the internal contract: spec, fingerprint, weights, library, device,
    image_size, has_text, model; plus dtype (float32 on CPU, float16 on GPU), vision
    (image tower adapter), text (text tower adapter or None), notice (the auto fallback
    warning, else None).
    """

    def __init__(
        self,
        *,
        spec: str,
        library: str,
        arch: str,
        weights: str,
        model: nn.Module,
        device: torch.device,
        digest: str,
        preprocess_fn: Callable[[Any], torch.Tensor],
        tokenizer: Callable[[list[str]], torch.Tensor] | None,
        notice: str | None = None,
    ):
        self.spec = spec
        self.library = library
        self.arch = arch
        self.weights = weights
        self.model = model
        self.device = device
        self.dtype = next(model.parameters()).dtype
        self.weights_sha256 = digest
        self.fingerprint = f"{spec}#{digest[:FINGERPRINT_HEX]}"
        self.notice = notice
        self._preprocess_fn = preprocess_fn  # the library's eval transform, as loaded
        self._bounded_fn = bounded_transform(preprocess_fn)  # the same, at a bounded cost per image
        self._fast_preprocess = FastPreprocess.of(self._bounded_fn)
        self._tokenizer = tokenizer
        if library == "open_clip":
            self.vision: VisionAdapter = OpenClipVision(model.visual)
            try:
                self.text: TextAdapter | None = TextAdapter(model)
            except BackboneError as exc:
                log.warning("backbone %s: text-side methods unavailable: %s", spec, exc)
                self.text = None
            self.image_size = int(model.visual.image_size[0])
        else:
            self.vision = TimmVision(model)
            self.text = None
            self.image_size = int(model.patch_embed.img_size[0])
        self.has_text = self.text is not None and tokenizer is not None

    def __repr__(self) -> str:
        return f"Backbone({self.fingerprint!r}, device={self.device}, dtype={self.dtype})"

    def info(self) -> dict:
        return {
            "id": self.spec,
            "fingerprint": self.fingerprint,
            "weights": self.weights,
            "device": str(self.device),
            "library": self.library,
        }

    # ---- images

    def preprocess(self, img: "Image.Image") -> torch.Tensor:
        """PIL image -> (3, S, S) float32 CPU tensor, as the library's eval transform does it
        (bit for bit: see ``FastPreprocess``), at a cost bounded by S rather than by the
        image's aspect ratio: an image more elongated than ``PLAIN_ASPECT_LIMIT`` is resized
        only where the center crop looks (see ``bounded_transform``), which gives the same
        tensor up to the last bits of the resampling weights."""
        img = img.convert("RGB")
        if self._fast_preprocess is not None:
            return self._fast_preprocess(img)
        return self._bounded_fn(img).to(torch.float32)

    def preprocess_batch(self, images: "list[Image.Image]") -> torch.Tensor:
        """PIL images -> (n, 3, S, S) float32 CPU tensor, each as ``preprocess`` makes it. On the
        numpy path no torch op runs on the calling thread (see ``FastPreprocess``)."""
        if self._fast_preprocess is not None:
            import numpy as np

            return torch.from_numpy(np.stack([self._fast_preprocess.array(img.convert("RGB")) for img in images]))
        return torch.stack([self.preprocess(img) for img in images])

    def encode_images(self, images: torch.Tensor, prompts: TokenPrompts | None = None) -> ImageFeatures:
        """images (B, 3, S, S) any device/dtype -> ImageFeatures (model dtype, on device)."""
        images = images.to(self.device, self.dtype)
        return self.vision.forward(images, prompts)

    # ---- text

    def require_text(self, what: str) -> TextAdapter:
        if not self.has_text:
            raise BackboneError(
                f"{what} needs a CLIP text tower, which backbone {self.spec} ({self.library}) does not have; "
                "use an open_clip backbone or an image-side method (vpt-shallow, vpt-deep, padding, linear-probe)"
            )
        assert self.text is not None
        return self.text

    def tokenize(self, texts: list[str]) -> torch.Tensor:  # -> (T, L) long on device
        self.require_text("tokenizing text")
        assert self._tokenizer is not None
        return self._tokenizer(texts).to(self.device)

    @property
    def text_tokens(self) -> "TextTokens | None":
        """Untruncated token counts of this backbone's tokenizer; None without a text tower."""
        if not self.has_text:
            return None
        if getattr(self, "_text_tokens", None) is None:
            self._text_tokens = TextTokens(self._tokenizer, getattr(self.model, "context_length", None))
        return self._text_tokens

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens of each text as the text encoder would need them (SOT and EOT included), before
        ``tokenize`` cuts them to the context length ``text_context_length``."""
        self.require_text("counting text tokens")
        assert self.text_tokens is not None
        return self.text_tokens.count(texts)

    @property
    def text_context_length(self) -> int:
        self.require_text("the text context length")
        assert self.text_tokens is not None
        return self.text_tokens.context_length

    def encode_text(self, texts: list[str]) -> torch.Tensor:  # -> (T, E) model dtype
        text = self.require_text("encoding text")
        return text.encode(self.tokenize(texts))

    @property
    def logit_scale(self) -> torch.Tensor:
        """exp(logit_scale) as a float32 scalar (100 for the OpenAI weights)."""
        scale = getattr(self.model, "logit_scale", None)
        if scale is None:
            return torch.tensor(100.0, device=self.device)
        return scale.detach().float().exp().reshape(())


class TextTokens:
    """A text tokenizer's untruncated view: the ids it makes of each text (SOT and EOT
    included) before the cut to ``context_length`` that ``tokenize`` does silently.

    Needs only the tokenizer, not the weights (``text_tokens_for_spec``)."""

    def __init__(self, tokenizer: Any, context_length: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.context_length = int(context_length or getattr(tokenizer, "context_length", None) or 77)

    def ids(self, texts: list[str]) -> list[list[int]]:
        tok = self.tokenizer
        if hasattr(tok, "encode") and hasattr(tok, "sot_token_id") and getattr(tok, "reduction_fn", None) is None:
            # open_clip's SimpleTokenizer: exactly what its __call__ builds before truncating
            return [[tok.sot_token_id, *tok.encode(t), tok.eot_token_id] for t in texts]
        inner = getattr(tok, "tokenizer", None)
        clean = getattr(tok, "clean_fn", None)
        if inner is not None and callable(clean):  # open_clip's HFTokenizer
            return [list(inner(clean(t), truncation=False)["input_ids"]) for t in texts]
        wide = tok(texts, context_length=64 * self.context_length)  # anything else: a context that never cuts
        return [row[row != 0].tolist() for row in wide]

    def count(self, texts: list[str]) -> list[int]:
        return [len(x) for x in self.ids(texts)]

    def decode(self, ids: list[int]) -> str | None:
        """The text the tokenizer reads in ``ids`` (as ``ids`` returns them), for messages; None
        when the tokenizer cannot say."""
        tok = self.tokenizer
        special = {getattr(tok, "sot_token_id", None), getattr(tok, "eot_token_id", None)}
        try:
            return " ".join(str(tok.decode([i for i in ids if i not in special])).split())
        except Exception:
            return None


_TEXT_TOKENS: dict[str, "TextTokens | None"] = {}


def text_tokens_for_spec(spec: str) -> "TextTokens | None":
    """The tokenizer of backbone ``spec`` without loading its weights (None: no text tower).
    'auto' and its fallback share one architecture. Raises BackboneError for a bad spec."""
    parsed = parse_spec(AUTO_SPEC if spec.strip() == "auto" else spec.strip())
    library, arch = parsed.library, parsed.arch
    key = f"{library}:{arch}"
    if key not in _TEXT_TOKENS:
        if library != "open_clip":
            _TEXT_TOKENS[key] = None
        else:
            import open_clip

            register_model_configs()
            cfg = open_clip.get_model_config(arch)
            if cfg is None:
                raise BackboneError(f"unknown open_clip architecture {arch!r}")
            _TEXT_TOKENS[key] = TextTokens(open_clip.get_tokenizer(arch))
    return _TEXT_TOKENS[key]


# ---------------------------------------------------------------- loading


def _freeze(model: nn.Module) -> nn.Module:
    """The one place the backbone is locked: no gradients, eval mode for good."""
    model.requires_grad_(False)
    model.eval()
    model.train = lambda mode=True: model  # type: ignore[method-assign]  # nobody flips it back
    return model


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise BackboneError(f"device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1): {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackboneError(f"device {device!r} requested but CUDA is not available")
    return dev


def _openclip_cached_file(arch: str, tag: str) -> str | None:
    """Path of an already-downloaded open_clip pretrained file, without touching the network."""
    import open_clip
    from open_clip import pretrained as ocp

    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        return None
    if cfg.get("file"):
        return cfg["file"] if os.path.isfile(cfg["file"]) else None
    hf = cfg.get("hf_hub", "")
    if hf and ocp.has_hf_hub():
        from huggingface_hub import try_to_load_from_cache

        model_id, filename = os.path.split(hf)
        names = [filename] if filename else []
        names = [n for f in names for n in (*ocp._get_safe_alternatives(f), f)]
        names += ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        for name in names:
            found = try_to_load_from_cache(model_id, name)
            if isinstance(found, str) and os.path.isfile(found):
                return found
    url = cfg.get("url", "")
    if url:
        target = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        if os.path.isfile(target):
            return target
    return None


def _network_reachable(timeout: float = _PROBE_TIMEOUT_S) -> bool:
    """True if a weights host answers a TCP connect within ``timeout`` (DNS included)."""
    result: list[bool] = []

    def probe() -> None:
        for host, port in _PROBE_HOSTS:
            try:
                with socket.create_connection((host, port), timeout=timeout):
                    result.append(True)
                    return
            except OSError:
                continue

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout * len(_PROBE_HOSTS) + 0.5)
    return bool(result)


def _short(exc: BaseException, limit: int = 400) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[:limit] + " ..."


def _load_open_clip(parsed: ParsedSpec) -> tuple[nn.Module, Callable, Callable, str | None]:
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    register_model_configs()
    if open_clip.get_model_config(parsed.arch) is None:
        known = open_clip.list_models()
        raise BackboneError(
            f"unknown open_clip architecture {parsed.arch!r}; known include {known[:12]} ... "
            f"({len(known)} in all, see open_clip.list_models())"
        )
    kwargs: dict[str, Any] = {"device": "cpu", "precision": "fp32", "weights_only": True}
    source_file: str | None = None
    if parsed.kind == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(parsed.seed)
            model = open_clip.create_model(parsed.arch, pretrained=None, **kwargs)
    else:
        if parsed.kind == "tag":
            tag_cfg = open_clip.get_pretrained_cfg(parsed.arch, parsed.tag)
            if not tag_cfg:
                tags = open_clip.list_pretrained_tags_by_model(parsed.arch)
                raise BackboneError(
                    f"unknown pretrained tag {parsed.tag!r} for open_clip:{parsed.arch}; known tags: {tags}; "
                    "or give a checkpoint path, or random"
                )
            kwargs["force_quick_gelu"] = bool(tag_cfg.get("quick_gelu", False))
            cached = _openclip_cached_file(parsed.arch, parsed.tag)
            if cached:
                # load the cached file directly: no update check against the hub
                pp = {k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg}
                kwargs["force_preprocess_cfg"] = pp
                source, source_file = cached, cached
            else:
                source = parsed.tag
        else:
            source = source_file = parsed.path
        try:
            model = open_clip.create_model(parsed.arch, pretrained=source, require_pretrained=True, **kwargs)
        except Exception as exc:  # open_clip raises RuntimeError/KeyError/OSError variously
            raise BackboneError(f"could not load weights {parsed.resolved}: {_short(exc)}") from None
    preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    tokenizer = open_clip.get_tokenizer(parsed.arch)
    return model, preprocess, tokenizer, source_file


def _load_timm(parsed: ParsedSpec) -> tuple[nn.Module, Callable, None, str | None]:
    import timm
    from timm.data import create_transform, resolve_data_config

    if not timm.is_model(parsed.arch):
        raise BackboneError(
            f"unknown timm architecture {parsed.arch!r}; see timm.list_models('vit_*') "
            "(pretrained tags go in the third field: timm:ARCH:TAG)"
        )
    source_file: str | None = None
    try:
        if parsed.kind == "random":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(parsed.seed)
                model = timm.create_model(parsed.arch, pretrained=False, num_classes=0)
        elif parsed.kind == "tag":
            name = f"{parsed.arch}.{parsed.tag}"
            if not timm.list_pretrained(name):
                tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{parsed.arch}.*")]
                raise BackboneError(f"unknown pretrained tag {parsed.tag!r} for timm:{parsed.arch}; known tags: {tags}")
            model = timm.create_model(name, pretrained=True, num_classes=0)
        else:
            source_file = parsed.path
            # timm's own loader: safetensors, or torch.load(weights_only=True); drops a classifier head
            model = timm.create_model(
                parsed.arch, pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": parsed.path}
            )
    except BackboneError:
        raise
    except Exception as exc:
        raise BackboneError(f"could not load weights {parsed.resolved}: {_short(exc)}") from None
    preprocess = create_transform(**resolve_data_config({}, model=model))
    return model, preprocess, None, source_file


#: Resized images up to this aspect ratio (long side / short side) take the library's own
#: resize-then-crop, bit for bit; more elongated ones are resized only where the crop looks.
#: The library's way materialises the whole resized image, S x (S * aspect): a 65536 x 1
#: strip on a 224-pixel backbone would be 224 x 14.7 million pixels (13 GB).
PLAIN_ASPECT_LIMIT = 2.0


def _pil_filter(interpolation: Any) -> Any:
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import pil_modes_mapping

    mode = interpolation if isinstance(interpolation, InterpolationMode) else InterpolationMode(interpolation)
    return pil_modes_mapping[mode]


_ORDER_PROBE: list[bool] = []


def _pillow_picks_smaller_pass() -> bool:
    """Whether this Pillow runs a two-axis resize vertical-first when the height shrinks and
    that intermediate is smaller (Pillow 13 does; older ones always go horizontal-first). Probed once on a
    random 64 x 64 image whose two orders give different pixels."""
    if not _ORDER_PROBE:
        import numpy as np
        from PIL import Image

        img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
        both = np.asarray(img.resize((128, 16), Image.Resampling.BICUBIC))
        v_first = np.asarray(img.resize((64, 16), Image.Resampling.BICUBIC).resize((128, 16), Image.Resampling.BICUBIC))
        _ORDER_PROBE.append(bool(np.array_equal(both, v_first)))
    return _ORDER_PROBE[0]


def _horizontal_first(w: int, h: int, out_w: int, out_h: int) -> bool:
    """The order Pillow's ``resize`` of a whole ``w x h`` image to ``out_w x out_h`` uses:
    vertical first when the height shrinks and that makes the intermediate smaller."""
    return not _pillow_picks_smaller_pass() or not (out_h < h and w * out_h < out_w * h)


class BoundedResizeCrop:
    """torchvision ``Resize(s)`` (shortest side to ``s``) then ``CenterCrop``, at a bounded cost.

    For an image whose resized shape is at most ``PLAIN_ASPECT_LIMIT`` times longer than
    wide, it calls the two library steps as they are (bit for bit the library's result).
    For a more elongated one it resizes only the window of the long axis that the center
    crop keeps: it cuts the band of source pixels the resampling filter reads for that
    window (window plus the filter's support), then runs Pillow's two resampling passes on
    the band, in the order Pillow uses for the whole image, with the window as ``box``.
    Same output pixel centres, filter and intermediate rounding as the library, up to the
    float rounding of the window's start (an 8-bit level here and there); the library's
    ``CenterCrop`` then crops the short axis. The pixels materialised are the band
    (``source short side x (crop + support)`` source pixels) and ``crop x s``, instead of
    ``s x (s * aspect)``.
    """

    def __init__(self, resize: Any, crop: Any) -> None:
        self.resize = resize
        self.crop = crop
        self.size = int(resize.size if isinstance(resize.size, int) else resize.size[0])
        self.filter = _pil_filter(resize.interpolation)
        self.support = {0: 0.5, 4: 0.5, 2: 1.0, 5: 1.0, 3: 2.0, 1: 3.0}.get(int(self.filter), 3.0)

    def __repr__(self) -> str:
        return f"BoundedResizeCrop({self.resize!r}, {self.crop!r})"

    def __call__(self, img: "Image.Image") -> "Image.Image":
        import math

        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = self.size, int(self.size * long / short)  # torchvision's arithmetic
        crop_h, crop_w = self.crop.size
        crop_long = crop_h if w <= h else crop_w
        if new_long <= PLAIN_ASPECT_LIMIT * new_short or crop_long > new_long:
            return self.crop(self.resize(img))
        start = int(round((new_long - crop_long) / 2.0))  # torchvision center_crop's offset
        scale = long / new_long  # source pixels per resized pixel along the long axis
        lo, hi = start * scale, (start + crop_long) * scale
        reach = self.support * max(scale, 1.0) + 2  # the filter's support in source pixels, and a margin
        b0, b1 = max(int(math.floor(lo - reach)), 0), min(int(math.ceil(hi + reach)), long)
        lo, hi = lo - b0, hi - b0
        f = self.filter
        if w <= h:  # portrait: a band of rows; output new_short x crop_long
            band = img.crop((0, b0, w, b1))
            if _horizontal_first(w, h, new_short, new_long):
                out = band.resize((new_short, b1 - b0), f).resize((new_short, crop_long), f, box=(0, lo, new_short, hi))
            else:
                out = band.resize((w, crop_long), f, box=(0, lo, w, hi)).resize((new_short, crop_long), f)
        else:  # landscape: a band of columns; output crop_long x new_short
            band = img.crop((b0, 0, b1, h))
            if _horizontal_first(w, h, new_long, new_short):
                out = band.resize((crop_long, h), f, box=(lo, 0, hi, h)).resize((crop_long, new_short), f)
            else:
                out = band.resize((b1 - b0, new_short), f).resize((crop_long, new_short), f, box=(lo, 0, hi, new_short))
        return self.crop(out)


def bounded_transform(fn: Callable[[Any], torch.Tensor]) -> Callable[[Any], torch.Tensor]:
    """The library transform ``fn`` with its PIL resize steps bounded in cost.

    In a torchvision ``Compose``, ``Resize(s)`` followed by ``CenterCrop`` becomes
    ``BoundedResizeCrop``, which leaves an ordinary image bit for bit as the library makes
    it (aspect up to ``PLAIN_ASPECT_LIMIT``). Other steps are bounded by their output size
    already: ``Resize((h, w))`` (squash; Pillow 13 runs the pass with the smaller
    intermediate first, so a thin strip never widens over all its rows),
    ``ResizeKeepRatio``, crops and pads. Returns ``fn`` itself when nothing needs bounding or ``fn``
    is not a ``Compose``.
    """
    from torchvision import transforms as T

    steps = getattr(fn, "transforms", None)
    if not isinstance(fn, T.Compose) or not isinstance(steps, list):
        return fn
    out: list[Any] = []
    i = 0
    while i < len(steps):
        step = steps[i]
        if type(step) is T.Resize and step.max_size is None:
            size = step.size
            if isinstance(size, int) or len(size) == 1:
                if i + 1 < len(steps) and type(steps[i + 1]) is T.CenterCrop:
                    out.append(BoundedResizeCrop(step, steps[i + 1]))
                    i += 2
                    continue
        out.append(step)
        i += 1
    if len(out) == len(steps) and all(a is b for a, b in zip(out, steps)):
        return fn
    return T.Compose(out)


class FastPreprocess:
    """The library's eval transform with its tensor stage in numpy.

    open_clip's and timm's eval transforms are a torchvision ``Compose`` of PIL steps
    (resize, crop, mode) then ``ToTensor`` and ``Normalize``. Run on the API's preprocessing
    threads, torch ops on a whole image start an OpenMP team per thread, whose spinning
    workers compete with the engine's forward for the cores; numpy does the same float32
    arithmetic (divide by 255, subtract the mean, divide by the std, element by element) on
    the calling thread only.
    ``of`` checks the result bit for bit against the library transform on a probe image and
    returns None (use the library transform) for any other pipeline or any difference.
    """

    def __init__(self, pil_steps: list[Callable[[Any], Any]], mean: Any, std: Any) -> None:
        import numpy as np

        self.pil_steps = pil_steps
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3)
        self.std = np.asarray(std, dtype=np.float32).reshape(3)

    def array(self, img: "Image.Image") -> "np.ndarray":
        """(3, S, S) float32, C-contiguous, computed with numpy only."""
        import numpy as np

        for step in self.pil_steps:
            img = step(img)
        if img.mode != "RGB":
            raise ValueError(f"preprocessing produced a {img.mode} image, expected RGB")
        a = np.asarray(img, dtype=np.float32)  # (S, S, 3), a fresh array
        a /= np.float32(255)
        a -= self.mean
        a /= self.std
        return np.ascontiguousarray(a.transpose(2, 0, 1))

    def __call__(self, img: "Image.Image") -> torch.Tensor:
        return torch.from_numpy(self.array(img))

    @classmethod
    def of(cls, fn: Callable[[Any], torch.Tensor]) -> "FastPreprocess | None":
        import numpy as np
        from PIL import Image
        from torchvision import transforms as T

        steps = getattr(fn, "transforms", None)
        if not isinstance(fn, T.Compose) or not isinstance(steps, list) or len(steps) < 2:
            return None
        to_tensor, norm = steps[-2], steps[-1]
        if not isinstance(to_tensor, T.ToTensor) or type(norm) is not T.Normalize or norm.inplace:
            return None
        if any(isinstance(s, (T.ToTensor, T.PILToTensor, torch.nn.Module)) and not isinstance(s, (T.Resize, T.CenterCrop))
               for s in steps[:-2]):
            return None  # a tensor step before ToTensor: not a PIL-only prefix
        try:
            fast = cls(list(steps[:-2]), torch.as_tensor(norm.mean).numpy(), torch.as_tensor(norm.std).numpy())
            rng = np.random.default_rng(0)
            probe = Image.fromarray(rng.integers(0, 256, size=(173, 211, 3), dtype=np.uint8))
            ok = torch.equal(fast(probe), fn(probe).to(torch.float32))
        except Exception:  # any surprise: the library transform it is
            return None
        if not ok:
            log.warning("numpy preprocessing differs from the library transform; using the library transform")
            return None
        return fast


def load_backbone(spec: str = "auto", device: str | torch.device | None = None) -> Backbone:
    """Load and freeze the backbone named by ``spec`` on ``device`` (default cuda if available).

    fp32 on CPU, float16 on GPU. Raises BackboneError for a bad spec, an unknown
    architecture or tag, or an unreadable checkpoint.
    """
    dev = _resolve_device(device)
    notice = None
    spec = spec.strip()
    if spec == "auto":
        parsed = parse_spec(AUTO_SPEC)
        if _openclip_cached_file(parsed.arch, parsed.tag or "") is None and not _network_reachable():
            notice = (
                f"backbone 'auto': {AUTO_SPEC} weights are not cached and cannot be fetched; "
                f"using RANDOM weights ({AUTO_FALLBACK_SPEC}); predictions are meaningless until real weights load"
            )
            parsed = parse_spec(AUTO_FALLBACK_SPEC)
        else:
            try:
                return _load(parsed, dev, None)
            except BackboneError as exc:
                notice = (
                    f"backbone 'auto': fetching {AUTO_SPEC} failed ({exc}); using RANDOM weights "
                    f"({AUTO_FALLBACK_SPEC})"
                )
                parsed = parse_spec(AUTO_FALLBACK_SPEC)
        log.warning(notice)
    else:
        parsed = parse_spec(spec)
    return _load(parsed, dev, notice)


def _load(parsed: ParsedSpec, dev: torch.device, notice: str | None) -> Backbone:
    if parsed.library == "open_clip":
        model, preprocess, tokenizer, source_file = _load_open_clip(parsed)
    else:
        model, preprocess, tokenizer, source_file = _load_timm(parsed)
    model = _freeze(model)
    digest = _weights_digest(parsed, model, source_file)  # fp32 CPU weights: device-independent
    if dev.type == "cuda":
        model = model.half()
    model = model.to(dev)
    return Backbone(
        spec=parsed.resolved,
        library=parsed.library,
        arch=parsed.arch,
        weights="random" if parsed.kind == "random" else "real",
        model=model,
        device=dev,
        digest=digest,
        preprocess_fn=preprocess,
        tokenizer=tokenizer,
        notice=notice,
    )
