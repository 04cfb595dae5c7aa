"""Image decoding that gives the same RGB uint8 tensor whatever the file's mode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from detkd.errors import DataError


def read_image(path: str | Path) -> torch.Tensor:
    """Decode ``path`` to a uint8 CHW RGB tensor, honouring EXIF orientation.

    Grayscale, palette, CMYK, 16-bit and alpha images are converted to RGB (alpha is
    composited on black, as most detection pipelines do implicitly).
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float64)
                peak = arr.max() if arr.size and arr.max() > 255 else 255.0
                im = Image.fromarray((arr / peak * 255.0).clip(0, 255).astype(np.uint8))
            if im.mode == "P":
                im = im.convert("RGBA")
            if im.mode in ("RGBA", "LA"):
                im = im.convert("RGB")
            elif im.mode != "RGB":
                im = im.convert("RGB")
            arr = np.asarray(im, dtype=np.uint8).copy()
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot decode image ({exc})") from None
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) after EXIF orientation, read from the header only."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot decode image ({exc})") from None
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    return h, w
