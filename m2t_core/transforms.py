"""ELIC-style analysis (g_a) and synthesis (g_s) transforms, 16x down-sampling, no GDN.

g_a: conv5x5/2 -> RBs -> conv5x5/2 -> RBs -> attn -> conv5x5/2 -> RBs -> conv5x5/2 (to C) -> attn
g_s mirrors it with stride-2 transposed convolutions.
"""

from __future__ import annotations

import torch
from torch import nn


def conv(in_ch: int, out_ch: int, kernel: int = 5, stride: int = 2) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2)


def deconv(in_ch: int, out_ch: int, kernel: int = 5, stride: int = 2) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(
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
        return self.layers(x)


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
        return self.layers(y_hat)
