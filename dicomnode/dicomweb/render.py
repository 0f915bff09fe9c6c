"""Rendered images (PS3.18 8.3.5.1.3, 10.4.1.1.3): a frame as JPEG or PNG, windowed, scaled."""

from __future__ import annotations

from io import BytesIO

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array

from dicomnode.core.errors import InvalidInput, NotFound

THUMBNAIL_SIZE = (128, 128)


def parse_window(text: str | None) -> tuple[float, float] | None:
    """``window=center,width[,function]`` (only the linear function)."""
    if not text:
        return None
    parts = text.split(",")
    try:
        center, width = float(parts[0]), float(parts[1])
    except (ValueError, IndexError):
        raise InvalidInput(f"window must be center,width[,function]; got {text!r}") from None
    if width <= 0:
        raise InvalidInput("window width must be greater than 0")
    if len(parts) > 2 and parts[2].strip().lower() not in ("linear", ""):
        raise InvalidInput(f"window function {parts[2]!r} is not supported; use linear")
    return center, width


def parse_viewport(text: str | None) -> tuple[int, int] | None:
    """``viewport=vw,vh`` (the source-region part of PS3.18 is not supported)."""
    if not text:
        return None
    try:
        width, height = (int(v) for v in text.split(",")[:2])
    except ValueError:
        raise InvalidInput(f"viewport must be width,height; got {text!r}") from None
    if not (0 < width <= 8192 and 0 < height <= 8192):
        raise InvalidInput("viewport width and height must be 1-8192")
    return width, height


def _to_8bit(frame: np.ndarray, ds: Dataset, window: tuple[float, float] | None) -> np.ndarray:
    values = apply_modality_lut(frame, ds).astype(np.float64)
    if window is not None:
        center, width = window
        low, high = center - width / 2, center + width / 2
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        values = apply_voi_lut(values, ds, index=0).astype(np.float64)
        low, high = float(values.min()), float(values.max())
    else:
        low, high = float(values.min()), float(values.max())
    scaled = np.clip((values - low) / max(high - low, 1e-9), 0, 1) * 255
    image = scaled.astype(np.uint8)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        image = 255 - image
    return image


def render(
    ds: Dataset,
    frame: int,
    media_type: str,
    window: tuple[float, float] | None = None,
    viewport: tuple[int, int] | None = None,
    quality: int = 90,
) -> bytes:
    """Frame `frame` (1-based) of the image `ds` (read with its pixels), encoded as
    `media_type`: greyscale windowed to 8 bits, colour as RGB (YBR converted, palette applied),
    a 1-bit segmentation as black and white."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if not 1 <= frame <= frames:
        raise NotFound(f"frame {frame} does not exist; the instance has {frames}")
    array = pixel_array(ds, index=frame - 1)
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric == "PALETTE COLOR":
        array = apply_color_lut(array, ds)
        if array.dtype != np.uint8:
            array = (array >> 8).astype(np.uint8)
        image = Image.fromarray(array, mode="RGB")
    elif int(ds.get("SamplesPerPixel", 1)) == 1:
        if int(ds.get("BitsAllocated", 8)) == 1:
            image = Image.fromarray((array > 0).astype(np.uint8) * 255, mode="L")
        else:
            image = Image.fromarray(_to_8bit(array, ds, window), mode="L")
    else:
        if array.dtype != np.uint8:
            array = (array.astype(np.float64) / max(float(array.max()), 1) * 255).astype(np.uint8)
        image = Image.fromarray(array, mode="RGB")
    if viewport is not None:
        image.thumbnail(viewport, Image.Resampling.LANCZOS)
    out = BytesIO()
    if media_type == "image/png":
        image.save(out, format="PNG")
    else:
        image.save(out, format="JPEG", quality=max(1, min(quality, 100)))
    return out.getvalue()
