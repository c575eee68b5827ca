"""m2t_core: the M2T / MT learned image codec (pure PyTorch + numpy + constriction).

    import m2t_core
    streams = m2t_core.compress(rgb_uint8)            # list[bytes], shipped default model
    rgb = m2t_core.decompress(streams[0])             # model found from the bitstream header
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .bitstream import (BitstreamError, ChecksumMismatchError, Header, ImageTooLargeError,
                        ModelMismatchError, UnsupportedVersionError, read_header)
from .codec import EncodedImage, M2TCodec
from .config import ConfigError, ModelConfig, load_model_config
from .image_io import ImageError, load_image, save_image, to_rgb_array
from .registry import (DEFAULT_MODEL, CheckpointError, ModelNotFoundError, UnknownStreamModelError,
                       list_models, load_checkpoint, load_model, load_model_for_header, save_checkpoint)

__version__ = "0.2.0"


def _resolve(model: M2TCodec | str | None) -> M2TCodec:
    return model if isinstance(model, M2TCodec) else load_model(model)


def compress(images, model: M2TCodec | str | None = None, **kwargs) -> list[bytes]:
    """Compress one RGB image or a batch (arrays or PIL images) -> one bitstream per image."""
    return _resolve(model).compress(images, **kwargs)


def decompress(data: bytes, model: M2TCodec | str | None = None, **kwargs) -> np.ndarray:
    """Decode a bitstream to RGB uint8 (H, W, 3). Without `model`, the registry model named
    in the header is loaded and its weights hash checked."""
    if model is None:
        # The header only selects among installed models (name + weights hash), never a path.
        model = load_model_for_header(read_header(data, **kwargs))
    return _resolve(model).decompress(data, **kwargs)


__all__ = [
    "BitstreamError", "ChecksumMismatchError", "CheckpointError", "ConfigError", "DEFAULT_MODEL",
    "EncodedImage", "Header", "ImageError", "ImageTooLargeError", "M2TCodec", "ModelConfig",
    "ModelMismatchError", "ModelNotFoundError", "UnknownStreamModelError", "UnsupportedVersionError", "compress", "decompress",
    "list_models", "load_checkpoint", "load_image", "load_model", "load_model_config", "load_model_for_header", "read_header",
    "save_checkpoint", "save_image", "to_rgb_array",
]
