"""GPU checks of the codec (skipped without CUDA; run on a GPU machine with `pytest tests/test_gpu.py`)."""

import numpy as np
import pytest
import torch

from m2t_core import BitstreamError, M2TCodec, ModelConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _model(mode: str, device: str) -> M2TCodec:
    torch.manual_seed(0)
    return M2TCodec(ModelConfig(mode=mode)).to(device).eval()


def _images():
    rng = np.random.default_rng(0)
    sizes = [(1, 1), (7, 13), (256, 256), (512, 768), (1500, 2000)]
    imgs = []
    for h, w in sizes:
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * 255 // max(w, 1)), (yy * 255 // max(h, 1)), ((xx + yy) % 256)], -1)
        imgs.append(np.clip(base + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8))
    return imgs


@pytest.mark.parametrize("mode", ["m2t", "mt"])
def test_cuda_roundtrip_bit_exact(mode):
    model = _model(mode, "cuda")
    for img in _images():
        enc = model.encode_image(img)
        assert np.array_equal(model.decompress(enc.bitstream), model.reconstruct(enc))


def test_cuda_window_batch_changes_nothing_but_speed():
    model = _model("m2t", "cuda")
    img = _images()[3]
    for wb in (1, 4, 64):
        enc = model.encode_image(img, window_batch=wb)
        assert np.array_equal(model.decompress(enc.bitstream), model.reconstruct(enc))


def test_cuda_stream_on_cpu_is_exact_or_detected():
    """A GPU-encoded stream decoded on the CPU must decode exactly or raise, never be wrong."""
    gpu, cpu = _model("m2t", "cuda"), _model("m2t", "cpu")
    assert gpu.weights_hash() == cpu.weights_hash()
    img = _images()[3]
    enc = gpu.encode_image(img)
    try:
        y_cpu = cpu.decode_latent(enc.bitstream)[1]
    except BitstreamError:
        return
    assert torch.equal(y_cpu.to(torch.int32).cpu(), enc.y_hat)
