"""GPU checks of the codec (skipped without CUDA; run on a GPU machine with `pytest tests/test_gpu.py`)."""

import numpy as np
import pytest
import torch

from m2t_core import Decoder, Encoder, M2TCodec, ModelConfig
from m2t_core import exact as X
from m2t_core import network as N

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
        enc = Encoder(model, batch_images=1, reconstruct=True).encode_image(img)
        assert np.array_equal(model.decompress(enc.bitstream), enc.x_hat)


def test_cuda_batches_change_nothing_in_the_entropy_model():
    """Windows of 1 or 16 images per pass: the same bytes (the exact model does not see the
    batch); a batched g_a may round latents differently, so it is fed the same latents."""
    from m2t_core import code_plan

    model = _model("m2t", "cuda")
    img = _images()[3]
    latents = [(Encoder(model, batch_images=1).encode_image(img).y_hat.float(), *img.shape[:2])] * 3
    streams = {wpp: [code_plan(p).bitstream for p in Encoder(model, windows_per_pass=wpp).plan(latents)]
               for wpp in (64, 1024)}
    assert streams[64] == streams[1024]


@pytest.mark.parametrize("mode", ["m2t", "mt"])
def test_cuda_stream_decodes_exactly_on_cpu(mode):
    """The format is portable: a GPU-encoded stream decodes on the CPU to the same latent and
    the same pixels (the integer g_s), and the other way round."""
    gpu, cpu = _model(mode, "cuda"), _model(mode, "cpu")
    assert gpu.weights_hash() == cpu.weights_hash()
    for img in _images()[2:4]:
        enc = Encoder(gpu).encode_image(img)
        y_cpu = Decoder(cpu).decode_latent(enc.bitstream)[1]
        assert torch.equal(y_cpu.to(torch.int32).cpu(), enc.y_hat)
        back = Encoder(cpu).encode_image(img)
        assert torch.equal(Decoder(gpu).decode_latent(back.bitstream)[1].to(torch.int32).cpu(), back.y_hat)
        assert np.array_equal(cpu.decompress(enc.bitstream), gpu.decompress(enc.bitstream))
        assert np.array_equal(cpu.decompress(back.bitstream), gpu.decompress(back.bitstream))


def test_cuda_decodes_the_golden_pixels():
    """The committed golden streams decode on the GPU to the pixels committed from the CPU."""
    import hashlib
    import json
    from pathlib import Path

    from m2t_core import load_model

    data_dir = Path(__file__).resolve().parent / "data"
    manifest = json.loads((data_dir / "golden.json").read_text())
    for version in ("v4", "v5"):  # integer-v1 and integer-v2
        for name, entry in manifest[version].items():
            model = load_model(name, device="cuda")
            rgb = model.decompress((data_dir / f"golden-{version}-{name}.m2t").read_bytes())
            sha = hashlib.sha256(np.ascontiguousarray(rgb).tobytes()).hexdigest()
            assert sha == entry["pixels_sha256"], (version, name)


def test_cuda_integer_parameters_equal_cpu():
    """The exact entropy model's integers, on CUDA and on the CPU, for every shipped model."""
    from m2t_core.registry import PACKAGE_WEIGHTS, load_checkpoint

    for path in sorted(PACKAGE_WEIGHTS.glob("*.safetensors")):
        cpu = load_checkpoint(path)
        gpu = load_checkpoint(path, device="cuda")
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(-5, 6, (16, cpu.cfg.tokens_per_window, cpu.cfg.C), generator=gen)
        masked = torch.rand(tokens.shape[:2], generator=gen) < 0.5
        for fn in ((N.m2t_teacher_forced,) if cpu.cfg.mode == "m2t" else ()):
            a, b = fn(X.CodingOps(cpu.exact), tokens), fn(X.CodingOps(gpu.exact), tokens.cuda())
            for f in ("mean_q", "level", "logit_q"):
                assert torch.equal(getattr(a, f), getattr(b, f).cpu()), (path.stem, f)
        a = N.mt_forward(X.CodingOps(cpu.exact), tokens, masked)
        b = N.mt_forward(X.CodingOps(gpu.exact), tokens.cuda(), masked.cuda())
        for f in ("mean_q", "level", "logit_q"):
            assert torch.equal(getattr(a, f), getattr(b, f).cpu()), (path.stem, f)
