"""Calibration data that ships with the environment (no downloads).

* English text: docstrings of Python standard-library modules (all-MiniLM-L6-v2 calibration/eval).
* Fashion-MNIST: the 500-image test sample committed with `builtin:fashion-vit`.
* Photographs: the natural images bundled with scikit-image (astronaut, cat, coffee, rocket, ...), cut into
  seeded random crops, for vision towers such as CLIP that expect natural images; or a folder of the user's own.

Images become `pixel_values` the way the model's Hugging Face image processor would make them: resized to the
model's `image_size`, converted to its `num_channels`, normalised with the mean/std of the
`preprocessor_config.json` next to its weights (else the defaults of its model family).
"""
from __future__ import annotations

import importlib
import inspect
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from safetensors.torch import load_file

FASHION_DIR = Path(__file__).resolve().parent / "builtin" / "fashion-vit"


# The standard-library modules whose docstrings make the English corpus, in corpus order (calibration and held-out
# sets are slices of it: do not reorder). Imported by name when the corpus is built: some fifty modules (asyncio,
# email, sqlite3, ...) that nothing else needs.
CORPUS_MODULES = (
    "json", "os", "re", "inspect", "collections", "functools", "itertools", "pathlib", "argparse", "logging",
    "subprocess", "threading", "asyncio", "typing", "dataclasses", "string", "textwrap", "shutil", "tempfile",
    "socket", "email", "http.client", "urllib.parse", "xml.dom.minidom", "csv", "sqlite3", "zipfile", "tarfile",
    "gzip", "pickle", "copy", "heapq", "bisect", "random", "statistics", "decimal", "fractions", "datetime",
    "calendar", "unittest", "doctest", "pdb", "ast", "dis", "tokenize", "codecs", "locale", "gettext",
    "hashlib", "hmac", "secrets", "uuid",
)


def _stdlib_modules() -> tuple:
    """The modules of `CORPUS_MODULES`, imported."""
    return tuple(importlib.import_module(name) for name in CORPUS_MODULES)


def stdlib_paragraphs(n: int, min_words: int = 20, max_words: int = 400, offset: int = 0) -> list[str]:
    """`n` English paragraphs (docstrings of stdlib modules, classes and functions), deterministic order."""
    out: list[str] = []
    seen: set[str] = set()
    for mod in _stdlib_modules():
        objs = [mod] + [getattr(mod, a) for a in sorted(dir(mod)) if not a.startswith("_")]
        for obj in objs:
            doc = inspect.getdoc(obj) if (inspect.ismodule(obj) or inspect.isclass(obj) or callable(obj)) else None
            if not doc:
                continue
            for para in re.split(r"\n\s*\n", doc):
                text = " ".join(para.split())
                words = text.split()
                if min_words <= len(words) <= max_words and text not in seen and not text.startswith(">>>"):
                    seen.add(text)
                    out.append(text)
    if len(out) < n + offset:
        raise ValueError(f"only {len(out)} stdlib paragraphs available, asked for {n + offset}")
    return out[offset : offset + n]


def long_texts(n: int, words: int, offset: int = 0) -> list[str]:
    """`n` texts of about `words` words made by joining consecutive stdlib paragraphs (for seq 512)."""
    paras = stdlib_paragraphs(n * 12 + 40, offset=offset)
    out, cur = [], []
    for p in paras:
        cur.append(p)
        if sum(len(c.split()) for c in cur) >= words:
            out.append(" ".join(cur))
            cur = []
            if len(out) == n:
                break
    return out


def tokenize(tokenizer, texts: list[str], seq_len: int, pad_to_max: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer(texts, padding="max_length" if pad_to_max else True, truncation=True, max_length=seq_len,
                    return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def fashion_sample(n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values (n,1,28,28) normalised, labels (n,)) from the committed Fashion-MNIST test sample."""
    path = FASHION_DIR / "test_sample.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; run tools/train_fashion_vit.py to create it")
    data = load_file(str(path))
    x, y = data["pixel_values"], data["labels"]
    return (x, y) if n is None else (x[:n], y[:n])


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# Photographs and textures in scikit-image's own data folder (installed with the package, never downloaded);
# synthetic test patterns (checkerboards, phantoms, logos) are left out.
SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                  "hubble_deep_field.jpg", "camera.png", "retina.jpg", "ihc.png", "coins.png", "moon.png",
                  "brick.png", "grass.png", "gravel.png", "cell.png", "clock_motion.png", "page.png", "text.png")
_CLIP_MEAN, _CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # OpenAI CLIP
_HF_DEFAULT = (0.5, 0.5, 0.5)  # ViTImageProcessor's default mean and std


@dataclass(frozen=True)
class ImagePreprocessing:
    """What a vision model expects: square `size` images with `channels` channels, normalised (x - mean) / std
    from values in [0, 1]."""
    size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def for_model(cls, model) -> "ImagePreprocessing":
        cfg = getattr(model, "config", None)
        cfg = getattr(cfg, "vision_config", cfg)  # a full CLIPModel carries the tower's config inside
        if cfg is None or not hasattr(cfg, "image_size"):
            raise ValueError(f"{type(model).__name__} has no vision config (image_size): it does not take images")
        size = cfg.image_size if isinstance(cfg.image_size, int) else int(cfg.image_size[0])
        channels = int(getattr(cfg, "num_channels", 3))
        clip = "clip" in str(getattr(cfg, "model_type", ""))
        mean, std = (_CLIP_MEAN, _CLIP_STD) if clip else (_HF_DEFAULT, _HF_DEFAULT)
        # from_pretrained records the weights' directory; its image processor config is the authority on mean/std
        proc = Path(str(getattr(cfg, "_name_or_path", "") or "")) / "preprocessor_config.json"
        if proc.is_file():
            try:
                meta = json.loads(proc.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{proc} is not valid JSON ({e})") from None
            mean, std = tuple(meta.get("image_mean", mean)), tuple(meta.get("image_std", std))
        mean, std = (tuple(float(v) for v in x) for x in (mean, std))
        if len(mean) == 1 or len(std) == 1:
            mean, std = mean[:1] * channels, std[:1] * channels
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"image mean/std have {len(mean)}/{len(std)} entries for a {channels}-channel model")
        return cls(size, channels, mean, std)

    def __call__(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Images [H, W, C] with values in [0, 1] (any size, 1/3/4 channels) -> pixel_values [n, channels, size, size]:
        the largest centred square, resized with antialiasing."""
        out = []
        for img in images:
            img = _to_channels(img, self.channels).permute(2, 0, 1)
            h, w = img.shape[1:]
            side = min(h, w)
            img = img[:, (h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
            out.append(F.interpolate(img[None], size=(self.size, self.size), mode="bilinear", antialias=True,
                                     align_corners=False)[0])
        x = torch.stack(out).clamp(0, 1)
        mean, std = (torch.tensor(v, dtype=x.dtype).view(1, -1, 1, 1) for v in (self.mean, self.std))
        return (x - mean) / std

    def to_unit(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """The inverse normalisation: pixel_values -> images [H, W, C] in [0, 1]."""
        mean, std = (torch.tensor(v, dtype=pixel_values.dtype).view(1, -1, 1, 1) for v in (self.mean, self.std))
        return list((pixel_values * std + mean).clamp(0, 1).permute(0, 2, 3, 1))


def _to_channels(img: torch.Tensor, channels: int) -> torch.Tensor:
    """[H, W] / [H, W, 1|3|4] in [0, 1] -> [H, W, channels] (alpha dropped, grey replicated, colour -> luma)."""
    img = img[..., None] if img.dim() == 2 else img[..., :3]
    if img.shape[-1] == channels:
        return img
    if channels == 1:
        return (img * torch.tensor([0.299, 0.587, 0.114], dtype=img.dtype)).sum(-1, keepdim=True)
    if channels == 3 and img.shape[-1] == 1:
        return img.expand(*img.shape[:2], 3)
    raise ValueError(f"cannot turn a {img.shape[-1]}-channel image into {channels} channels")


def _unit(array: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(array))
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    if x.dtype == torch.bool:
        return x.float()
    x = x.float()
    return x / 65535.0 if x.max() > 255 else (x / 255.0 if x.max() > 1 else x)


IMAGE_PARTS = ("all", "tune", "held-out")


def natural_images(n: int, prep: ImagePreprocessing, seed: int = 0, part: str = "all") -> torch.Tensor:
    """`n` calibration images: seeded random square crops (35-100% of the short side, random flips) of the
    photographs bundled with scikit-image, preprocessed for the model. Deterministic for a given seed.
    `part` "tune" crops only the even-numbered photographs, "held-out" only the odd-numbered ones, so the two
    parts never share a pixel."""
    # scikit-image: optional (extra `3d`), only these calibration photographs need it here
    import skimage
    from skimage.io import imread

    if part not in IMAGE_PARTS:
        raise ValueError(f"part must be one of {', '.join(IMAGE_PARTS)}, got {part!r}")
    folder = Path(skimage.__file__).parent / "data"
    names = SKIMAGE_PHOTOS if part == "all" else SKIMAGE_PHOTOS[part == "held-out"::2]
    photos = [_unit(imread(folder / name)) for name in names if (folder / name).is_file()]
    if not photos:
        raise FileNotFoundError(f"no bundled photographs found in {folder} (is scikit-image installed completely?)")
    g = torch.Generator().manual_seed(seed)
    crops = []
    for i in range(n):
        img = photos[i % len(photos)]
        h, w = img.shape[:2]
        side = max(8, int(min(h, w) * (0.35 + 0.65 * float(torch.rand((), generator=g)))))
        top = int(torch.randint(0, h - side + 1, (), generator=g))
        left = int(torch.randint(0, w - side + 1, (), generator=g))
        crop = img[top:top + side, left:left + side]
        crops.append(crop.flip(1) if float(torch.rand((), generator=g)) < 0.5 else crop)
    return prep(crops)


def folder_images(folder: str | Path, n: int, prep: ImagePreprocessing) -> torch.Tensor:
    """Up to `n` image files of `folder` (sorted by name), preprocessed for the model."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:n]
    if not files:
        raise ValueError(f"--calib {folder}: the folder has no image files ({', '.join(IMAGE_SUFFIXES)})")
    images = []
    for f in files:
        try:
            with Image.open(f) as im:
                images.append(_unit(np.array(im.convert("RGBA" if im.mode in ("RGBA", "LA", "P") else "RGB"))))
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"--calib {folder}: cannot read image {f.name} ({e})") from None
    return prep(images)


def fashion_preprocessing() -> ImagePreprocessing:
    """The committed Fashion-MNIST sample's own format (28x28 grey, normalised as the ViT was trained)."""
    meta = json.loads((FASHION_DIR / "preprocessor_config.json").read_text())
    return ImagePreprocessing(28, 1, tuple(meta["image_mean"]), tuple(meta["image_std"]))
