"""ELIC-style analysis (g_a) and synthesis (g_s) transforms, 16x down-sampling, no GDN.

g_a: conv5x5/2 -> RBs -> conv5x5/2 -> RBs -> attn -> conv5x5/2 -> RBs -> conv5x5/2 (to C) -> attn
g_s mirrors it with stride-2 transposed convolutions.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn


def conv(in_ch: int, out_ch: int, kernel: int = 5, stride: int = 2) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2)


class SubpixelConvTranspose2d(nn.ConvTranspose2d):
    """A transposed convolution (same parameters and state-dict keys) that runs on CPU as
    one ordinary convolution followed by a pixel shuffle.

    Output pixel s*m + r gathers inputs m + j with kernel tap r + padding - s*j, so each of
    the s*s output phases is a small ordinary convolution; stacking the phases as output
    channels gives one convolution with a (s*s*C_out, C_in, k', k') kernel. On one CPU
    thread oneDNN runs that 1.2 to 2x faster than the transposed convolution (measured at
    the shapes of g_s; bench/codec_speed.py). The result equals the transposed convolution
    up to float rounding (summation order). GPUs and training keep the native operator.
    """

    def forward(self, x: torch.Tensor, output_size=None) -> torch.Tensor:
        if x.device.type != "cpu" or torch.is_grad_enabled() or output_size is not None:
            return super().forward(x, output_size)
        kernel, padding = self._subpixel_kernel()
        s = self.stride[0]
        return F.pixel_shuffle(F.conv2d(x, kernel, self.bias.repeat_interleave(s * s), padding=padding), s)

    def _subpixel_kernel(self) -> tuple[torch.Tensor, int]:
        s, p, k = self.stride[0], self.padding[0], self.kernel_size[0]
        assert self.stride == (s, s) and self.padding == (p, p) and self.kernel_size == (k, k)
        assert self.output_padding == (s - 1, s - 1) and self.groups == 1 and self.dilation == (1, 1)
        # Output phase r uses offsets j with 0 <= r + p - s*j < k.
        j_min = min(-((k - 1 - r - p) // s) for r in range(s))
        j_max = max((r + p) // s for r in range(s))
        assert j_min == -j_max, "asymmetric sub-pixel kernel"
        size = j_max - j_min + 1
        c_in, c_out = self.weight.shape[:2]
        kernel = self.weight.new_zeros(c_out, s, s, c_in, size, size)  # (C_out, r_y, r_x, C_in, j_y, j_x)
        for r_y in range(s):
            for j_y in range(j_min, j_max + 1):
                t_y = r_y + p - s * j_y
                if not 0 <= t_y < k:
                    continue
                for r_x in range(s):
                    for j_x in range(j_min, j_max + 1):
                        t_x = r_x + p - s * j_x
                        if 0 <= t_x < k:
                            kernel[:, r_y, r_x, :, j_y - j_min, j_x - j_min] = self.weight[:, :, t_y, t_x].t()
        return kernel.reshape(c_out * s * s, c_in, size, size), j_max  # (s*s*C_out, C_in, k', k')


def deconv(in_ch: int, out_ch: int, kernel: int = 5, stride: int = 2) -> nn.ConvTranspose2d:
    return SubpixelConvTranspose2d(
        in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, output_padding=stride - 1
    )


class ResidualBottleneck(nn.Module):
    """1x1 (N/2, ReLU) -> 3x3 (N/2, ReLU) -> 1x1 (N), plus the input."""

    def __init__(self, channels: int):
        super().__init__()
        mid = channels // 2
        self.body = nn.Sequential(
            nn.Conv2d(channels, mid, 1), nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(mid, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class SimplifiedAttention(nn.Module):
    """Cheng et al. 2020: x + trunk(x) * sigmoid(mask(x)), both branches of 3 residual units."""

    def __init__(self, channels: int, units: int = 3):
        super().__init__()
        self.trunk = nn.Sequential(*[ResidualBottleneck(channels) for _ in range(units)])
        self.mask = nn.Sequential(
            *[ResidualBottleneck(channels) for _ in range(units)], nn.Conv2d(channels, channels, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.trunk(x) * torch.sigmoid(self.mask(x))


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device type
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def _fp32_ends(layers: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """`layers(x)`; under autocast the first and the last layer run in fp32. In bf16 an input
    pixel in [0.5, 1] or a reconstructed one is rounded to 1/256 (about one grey level) and a
    latent above 32 to 1/4: fine-tuning m2t-small-q3 768 crops with the ends in bf16 lost
    0.13 dB on val against fp32 at equal crops (bench/train_speed.py). The ends have 3 input
    or output channels, or work on the 16x-down-sampled latent; g_a's first-stage residual
    stream stays fp32 too (fp32 + a bf16 block is fp32), its convolutions bf16. Together
    they cost 17 % of a CPU step and recovered most of the loss (docs/training.md)."""
    if not _autocast_on(x.device.type):
        return layers(x)
    with torch.autocast(x.device.type, enabled=False):
        h = layers[0](x.float())
    h = layers[1:-1](h)
    with torch.autocast(x.device.type, enabled=False):
        return layers[-1](h.float())


def _blocks(channels: int, count: int) -> list[nn.Module]:
    return [ResidualBottleneck(channels) for _ in range(count)]


class AnalysisTransform(nn.Module):
    """g_a: (B, 3, H, W) in [0, 1] -> y (B, C, H/16, W/16)."""

    def __init__(self, N: int, C: int, blocks_per_stage: int, attention: bool):
        super().__init__()
        attn = (lambda ch: [SimplifiedAttention(ch)]) if attention else (lambda ch: [])
        self.layers = nn.Sequential(
            conv(3, N), *_blocks(N, blocks_per_stage),
            conv(N, N), *_blocks(N, blocks_per_stage), *attn(N),
            conv(N, N), *_blocks(N, blocks_per_stage),
            conv(N, C), *attn(C),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _fp32_ends(self.layers, x)


class SynthesisTransform(nn.Module):
    """g_s: y_hat (B, C, h, w) -> x_hat (B, 3, 16h, 16w), roughly in [0, 1] (not clamped)."""

    def __init__(self, N: int, C: int, blocks_per_stage: int, attention: bool):
        super().__init__()
        attn = (lambda ch: [SimplifiedAttention(ch)]) if attention else (lambda ch: [])
        self.layers = nn.Sequential(
            *attn(C), deconv(C, N), *_blocks(N, blocks_per_stage),
            deconv(N, N), *attn(N), *_blocks(N, blocks_per_stage),
            deconv(N, N), *_blocks(N, blocks_per_stage),
            deconv(N, 3),
        )

    def forward(self, y_hat: torch.Tensor) -> torch.Tensor:
        return _fp32_ends(self.layers, y_hat)


# ---------------------------------------------------------------------- CPU inference

# How g_a runs for inference on a CPU: "frozen" (TorchScript, frozen and optimised for
# inference: oneDNN convolutions with pre-packed weights and fused element-wise work) or
# "eager" (the nn.Module as it is; M2T_EAGER_TRANSFORMS=1). Frozen g_a is 1.4x faster on one
# thread at 768x512 and 1920x1080 (bench/codec_speed.py --stages). Decoding runs the integer
# g_s (int_synthesis.py); the float g_s (training, calibration) stays eager: frozen it
# was no faster at 768x512 and 15 % slower at 1920x1080 (FROZEN_TRANSFORMS). The two forms
# differ only in float rounding, which g_a may: the entropy model, the only part a decoder
# must reproduce, is exact integer arithmetic either way.
FROZEN_TRANSFORMS = ("g_a",)
CPU_TRANSFORMS = "eager" if os.environ.get("M2T_EAGER_TRANSFORMS", "") not in ("", "0") else "frozen"

# The frozen g_a in bf16 where the CPU has AMX-BF16: about 3x faster than float32 at 768x512
# on one thread of a Xeon with AMX, changing 0.1-1 % of the rounded latent's values, and
# Kodak's mean bpp and PSNR by less than 0.1 % and 0.01 dB (every shipped model:
# bench/analysis_precision.py). CPUs with AVX512-BF16 alone keep float32 (not measured for
# g_a there). The encoder decides the latent and the stream carries it, so decoding is exact
# either way. M2T_BF16_ANALYSIS=0 keeps float32, =1 takes bf16 on any CPU (emulated where
# bf16 is not native: slower).
BF16_ANALYSIS_ENV = "M2T_BF16_ANALYSIS"


def bf16_analysis() -> bool:
    """Whether the frozen g_a runs in bf16 here (BF16_ANALYSIS_ENV, else where the CPU has AMX-BF16)."""
    from .sysinfo import cpu_flags

    setting = os.environ.get(BF16_ANALYSIS_ENV, "")
    return "amx_bf16" in cpu_flags() if setting == "" else setting != "0"


def frozen_for_inference(module: nn.Module, in_channels: int, bf16: bool = False):
    """`module` (g_a or g_s, float32 on the CPU) traced, frozen and optimised for inference:
    a function of float32 (B, in_channels, H, W) to float32. bf16: a bf16 copy of the module,
    channels-last, runs it (float32 in and out).

    The trace holds no shape: every layer of g_a and g_s is a convolution, pixel shuffle or
    element-wise op, so the one graph serves every input size (tests/test_codec.py compares it
    with the eager module at several sizes). Its weights are copies: a module trained further
    needs a new one (M2TCodec rebuilds it when the weights change)."""
    import copy
    import warnings

    example = torch.zeros(1, in_channels, 32, 32)
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        # TorchScript is deprecated upstream in favour of torch.compile, which would need a C++
        # compiler on every worker and minutes of compilation per input shape; should a future
        # torch drop it, M2TCodec falls back to the eager modules (and says so in its numerics).
        warnings.simplefilter("ignore", DeprecationWarning)
        if not bf16:
            traced = torch.jit.trace(module.eval(), example, check_trace=False)  # SubpixelConvTranspose2d's inference path
            return torch.jit.optimize_for_inference(torch.jit.freeze(traced))
        low = copy.deepcopy(module).eval().to(torch.bfloat16, memory_format=torch.channels_last)
        # Frozen only: optimize_for_inference's layout passes are for float32.
        frozen = torch.jit.freeze(torch.jit.trace(low, _bf16_channels_last(example), check_trace=False))
    return lambda x: frozen(_bf16_channels_last(x)).float()


def _bf16_channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16, memory_format=torch.channels_last)
