"""m2t_core: the M2T / MT learned image codec (pure PyTorch + numpy + constriction).

    import m2t_core
    streams = m2t_core.compress(rgb_uint8)            # list[bytes], shipped default model
    streams = m2t_core.compress(rgb, model="vr.safetensors", quality=5.5)  # a variable-rate model
    rgb = m2t_core.decompress(streams[0])             # model found from the bitstream header

The parts: `M2TCodec` (model.py: transforms, the entropy network's parameters, the exact
entropy model, training forward, identity), `Encoder` (encoder.py: images -> bitstreams,
batched, with coding threads) and `Decoder` (decoder.py: bitstreams -> latents -> pixels,
batched, previews from stream prefixes).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .bitstream import (BitstreamError, ChecksumMismatchError, Header, ImageTooLargeError,
                        ModelMismatchError, UnsupportedVersionError, read_header)
from .config import ConfigError, ModelConfig, load_model_config
from .registry import (DEFAULT_MODEL, CheckpointError, ModelNotFoundError, UnknownStreamModelError,
                       list_models, load_checkpoint, load_model, load_model_for_header, save_checkpoint)

if TYPE_CHECKING:
    import numpy as np

    from .model import M2TCodec

__version__ = "0.9.0"

# Names whose modules import torch, imported on first use (PEP 562): `import m2t_core`, the
# bitstream, the config and the registry's listing stay fast (`m2t --version`, `m2t info`).
_LAZY = {
    "Decoder": "decoder", "PartialStreamWarning": "decoder", "Preview": "decoder",
    "CodingPlan": "encoder", "EncodedImage": "encoder", "Encoder": "encoder", "code_plan": "encoder",
    "ImageError": "image_io", "load_image": "image_io", "save_image": "image_io", "to_rgb_array": "image_io",
    "M2TCodec": "model",
    "Target": "rate_control", "encode_to_target": "rate_control", "load_ladder": "rate_control",
    "encode_at_quality": "rate_control", "QualityError": "rate",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'm2t_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def _resolve(model: M2TCodec | str | None) -> M2TCodec:
    from .model import M2TCodec

    return model if isinstance(model, M2TCodec) else load_model(model)


def compress(images, model: M2TCodec | str | None = None, max_pixels: int | None = None,
             quality: float | None = None, refine_steps: int = 0) -> list[bytes]:
    """Compress one RGB image or a batch (arrays or PIL images) -> one bitstream per image; a
    variable-rate model's at `quality` (None: its middle level); `refine_steps` > 0 refines
    each latent before coding (refine.py: a slower encoder, fewer bits, the same decoder)."""
    return _resolve(model).compress(images, quality=quality, refine_steps=refine_steps,
                                    **({} if max_pixels is None else {"max_pixels": max_pixels}))


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
    "BitstreamError", "CheckpointError", "ChecksumMismatchError", "CodingPlan", "ConfigError", "DEFAULT_MODEL",
    "Decoder", "EncodedImage", "Encoder", "Header", "ImageError", "ImageTooLargeError", "M2TCodec",
    "ModelConfig", "ModelMismatchError", "ModelNotFoundError", "PartialStreamWarning", "Preview", "QualityError",
    "Target",
    "UnknownStreamModelError", "UnsupportedVersionError", "code_plan", "compress", "decompress",
    "encode_at_quality", "encode_to_target", "list_models", "load_checkpoint", "load_image", "load_ladder",
    "load_model",
    "load_model_config", "load_model_for_header", "read_header", "save_checkpoint", "save_image",
    "to_rgb_array",
]
