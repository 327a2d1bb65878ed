"""The images of image-text samples: where one may come from and the limits it must keep.

An image is a local path (a relative one is resolved against the folder of the file the
samples were read from, else the current directory), raw bytes, a PIL image or a base64
``data:`` URI. URLs are refused: forvalue reads nothing from the network. Every failure is an
ImageError, which the sample encoder turns into a per-sample error naming the image.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*),", re.DOTALL)


class ImageError(ValueError):
    """An image that cannot be used (missing, unreadable, corrupt, too large, a URL)."""


@dataclass(frozen=True)
class ImageLimits:
    """The largest image accepted: decoded pixels (width x height) and encoded bytes. A
    processor resizes images anyway; the limits keep one sample from exhausting memory."""

    max_pixels: int = 4096 * 4096
    max_bytes: int = 32 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.max_pixels < 1 or self.max_bytes < 1:
            raise ValueError("image limits must be positive")


def describe(source: Any) -> str:
    """A short name of an image source for error messages (never its whole content)."""
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        return "a data URI" if text.startswith("data:") else repr(text)
    if isinstance(source, (bytes, bytearray)):
        return f"{len(source)} bytes"
    if isinstance(source, Image.Image):
        return f"a {source.width}x{source.height} PIL image"
    return f"a {type(source).__name__}"


def load_image(source: Any, *, root: str | os.PathLike | None, limits: ImageLimits) -> Image.Image:
    """The RGB image of ``source``, decoded and checked against ``limits``."""
    if isinstance(source, Image.Image):
        _check_pixels(source, limits)
        return source.convert("RGB")
    if isinstance(source, os.PathLike) or (isinstance(source, str) and not source.startswith("data:")):
        return _decode(_read_path(os.fspath(source), root, limits), limits)
    if isinstance(source, str):
        return _decode(_data_uri_bytes(source, limits), limits)
    if isinstance(source, (bytes, bytearray)):
        _check_bytes(len(source), limits)
        return _decode(bytes(source), limits)
    raise ImageError(f"an image is a path, bytes, a PIL image or a data URI, not a {type(source).__name__}")


def _read_path(text: str, root: str | os.PathLike | None, limits: ImageLimits) -> bytes:
    if _URL.match(text):
        raise ImageError("URLs are refused (forvalue reads nothing from the network); "
                         "give a local path, bytes or a base64 data URI")
    path = Path(text).expanduser()
    if not path.is_absolute() and root is not None:
        path = Path(root) / path
    try:
        _check_bytes(path.stat().st_size, limits)
        return path.read_bytes()
    except FileNotFoundError:
        raise ImageError(f"no such image file: {path}") from None
    except OSError as error:
        raise ImageError(f"cannot read image file {path}: {error.strerror or error}") from None


def _data_uri_bytes(text: str, limits: ImageLimits) -> bytes:
    match = _DATA_URI.match(text)
    if match is None or ";base64" not in match["params"]:
        raise ImageError("a data URI image must be base64: data:image/png;base64,...")
    if match["mime"] and not match["mime"].startswith("image/"):
        raise ImageError(f"the data URI holds {match['mime']}, not an image")
    payload = text[match.end():]
    _check_bytes(len(payload) * 3 // 4, limits)  # before decoding: never hold more than the limit
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("the data URI is not valid base64") from None


def _decode(data: bytes, limits: ImageLimits) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as image:
            _check_pixels(image, limits)  # the header gives the size: check before decoding
            return image.convert("RGB")
    except ImageError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError):
        raise ImageError("not a readable image (unknown format or corrupt)") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"the image is corrupt: {error}") from None


def _check_pixels(image: Image.Image, limits: ImageLimits) -> None:
    if image.width * image.height > limits.max_pixels:
        raise ImageError(f"the image has {image.width}x{image.height} pixels, more than the limit of "
                         f"{limits.max_pixels}")


def _check_bytes(size: int, limits: ImageLimits) -> None:
    if size > limits.max_bytes:
        raise ImageError(f"the image has {size} bytes, more than the limit of {limits.max_bytes}")
