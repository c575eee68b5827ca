"""m2t_core: the M2T / MT learned image codec (pure PyTorch + numpy + constriction).

    import m2t_core
    streams = m2t_core.compress(rgb_uint8)            # list[bytes], shipped default model
    rgb = m2t_core.decompress(streams[0])             # model found from the bitstream header

The parts: `M2TCodec` (model.py: transforms, the entropy network's parameters, the exact
entropy model, training forward, identity), `Encoder` (encoder.py: images -> bitstreams,
batched, with coding threads) and `Decoder` (decoder.py: bitstreams -> latents -> pixels,
batched, previews from stream prefixes).
"""

from __future__ import annotations

import numpy as np

from .bitstream import (BitstreamError, ChecksumMismatchError, Header, ImageTooLargeError,
                        ModelMismatchError, UnsupportedVersionError, read_header)
from .config import ConfigError, ModelConfig, load_model_config
from .decoder import Decoder, PartialStreamWarning, Preview
from .encoder import CodingPlan, EncodedImage, Encoder, code_plan
from .image_io import ImageError, load_image, save_image, to_rgb_array
from .model import M2TCodec
from .registry import (DEFAULT_MODEL, CheckpointError, ModelNotFoundError, UnknownStreamModelError,
                       list_models, load_checkpoint, load_model, load_model_for_header, save_checkpoint)

__version__ = "0.3.0"


def _resolve(model: M2TCodec | str | None) -> M2TCodec:
    return model if isinstance(model, M2TCodec) else load_model(model)


def compress(images, model: M2TCodec | str | None = None, max_pixels: int | None = None) -> list[bytes]:
    """Compress one RGB image or a batch (arrays or PIL images) -> one bitstream per image."""
    return _resolve(model).compress(images, **({} if max_pixels is None else {"max_pixels": max_pixels}))


def decompress(data: bytes, model: M2TCodec | str | None = None, max_pixels: int | None = None,
               steps: int | None = None, max_bytes: int | None = None) -> np.ndarray:
    """Decode a bitstream to RGB uint8 (H, W, 3). Without `model`, the registry model named
    in the header is loaded and its weights hash checked. `steps` / `max_bytes`: a preview
    from the first coding steps (Decoder.preview); a stream cut at a step boundary decodes
    as a preview too (with a PartialStreamWarning)."""
    limits = {} if max_pixels is None else {"max_pixels": max_pixels}
    if model is None:
        # The header only selects among installed models (name + weights hash), never a path;
        # a prefix of a stream names its model as well as the whole stream.
        model = load_model_for_header(read_header(data, prefix=True, **limits))
    return _resolve(model).decompress(data, steps=steps, max_bytes=max_bytes, **limits)


__all__ = [
    "BitstreamError", "ChecksumMismatchError", "CheckpointError", "CodingPlan", "ConfigError", "DEFAULT_MODEL",
    "Decoder", "EncodedImage", "Encoder", "Header", "ImageError", "ImageTooLargeError", "M2TCodec", "ModelConfig",
    "ModelMismatchError", "ModelNotFoundError", "PartialStreamWarning", "Preview", "UnknownStreamModelError",
    "UnsupportedVersionError", "code_plan", "compress", "decompress", "list_models", "load_checkpoint",
    "load_image", "load_model", "load_model_config", "load_model_for_header", "read_header", "save_checkpoint",
    "save_image", "to_rgb_array",
]
