"""Decoding the images a client sends (base64 or multipart bytes, PNG or JPEG), each checked before decoding."""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np

from PoE.query.service.limits import ClientError, one_line

IMAGE_FORMATS = ("PNG", "JPEG")


def decode_image(data: bytes, index: int, size: int) -> np.ndarray:
    """One PNG or JPEG as uint8 H x W x 3 (``PoE.core.data.image_batch`` then checks it as the Python API does).
    The size is checked from the header, before the pixels are decoded, so a small file cannot expand into
    a huge image."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():  # the size is checked below, before any pixel is decoded
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
        with im:
            if im.format not in IMAGE_FORMATS:
                raise ClientError(400, f"image {index} is {im.format}; accepted: PNG or JPEG")
            if im.size != (size, size):
                raise ClientError(
                    400,
                    f"image {index} is {im.size[0]}x{im.size[1]}; this pool takes {size}x{size} RGB images "
                    "(resize first; the web page does)",
                )
            return np.array(im.convert("RGB"))  # a writable copy: torch.from_numpy warns on read-only arrays
    except UnidentifiedImageError:
        raise ClientError(400, f"image {index} is not an image; accepted: PNG or JPEG") from None
    except Image.DecompressionBombError:
        raise ClientError(
            400,
            f"image {index} is far larger than {size}x{size}; this pool takes {size}x{size} RGB "
            "images (resize first; the web page does)",
        ) from None
    except (OSError, SyntaxError, ValueError) as e:
        why = one_line(e)
        raise ClientError(400, f"image {index} is corrupt or truncated ({why}); accepted: PNG or JPEG") from None


def decode_base64(text: str, index: int) -> bytes:
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ClientError(400, f"image {index} is not valid base64; send base64-encoded PNG or JPEG bytes") from None
