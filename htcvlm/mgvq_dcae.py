"""The published MGVQ encoder, in plain PyTorch: the network of MGVQ's released tokenizers.

MGVQ's tokenizers use a DC-AE (EfficientViT) style encoder. For the paper's f16 tokenizer, with C = 32 latent
channels and G = 8 groups:

    stem       3x3 conv 3 -> 64, pixel-unshuffle                        -> 256 ch at 1/2
    stage 1    4 residual conv blocks at 256,  downsample to 512         -> 1/4
    stage 2    8 residual conv blocks at 512,  downsample to 512         -> 1/8
    stage 3    2 linear-attention blocks at 512, downsample to 1024      -> 1/16
    stage 4    2 linear-attention blocks at 1024
    head       3x3 conv 1024 -> C, plus the channel average of each run of 1024 / C channels
    quant_conv grouped 1x1 conv C -> C (G groups): the latent that MultiGroupQuantizer matches

Every downsampling is a 3x3 conv to a quarter of the new width followed by a pixel-unshuffle (space to
channels), plus a parameter-free shortcut: the pixel-unshuffled input averaged over runs of channels. Norms
are RMSNorm over channels with a bias (MGVQ's Triton kernel, here as PyTorch). The encoder takes images in
[-1, 1], as MGVQ's evaluation feeds them ((x / 255 - 0.5) * 2); `MGVQ.encode` converts OneToken's [0, 1].
Module names are OneToken's own; htcvlm/formats/mgvq.py maps the published checkpoint's keys onto them.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from htcvlm.config import MGVQConfig

logger = logging.getLogger(__name__)

HEAD_DIM = 32  # channels per linear-attention head in every published MGVQ encoder
GLU_EXPANSION = 4  # hidden width of the gated conv MLP, in multiples of the block width


class RMSNorm2d(nn.Module):
    """RMS over the channels of each position, then a per-channel scale and bias; computed in fp32."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.square().mean(dim=1, keepdim=True) + self.eps)
        return (y * self.weight.float()[:, None, None] + self.bias.float()[:, None, None]).to(x.dtype)


def channel_average(x: torch.Tensor, out_channels: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, out_channels, H, W): the mean of each run of C / out_channels adjacent channels."""
    b, c, h, w = x.shape
    return x.view(b, out_channels, c // out_channels, h, w).mean(dim=2)  # (B, out, C / out, H, W) -> mean


class ResBlock(nn.Module):
    """x + norm(conv2(silu(conv1(x)))), both convs 3x3 at the stage's width."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.norm = RMSNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.norm(self.conv2(F.silu(self.conv1(x))))


class LinearAttention(nn.Module):
    """ReLU linear attention over all positions, heads of HEAD_DIM channels (EfficientViT's LiteMLA with no
    multi-scale branch): out_n = sum_m v_m (k_m . q_n) / (sum_m k_m . q_n), with q and k through a ReLU."""

    def __init__(self, width: int, eps: float = 1e-15) -> None:
        super().__init__()
        if width % HEAD_DIM:
            raise ValueError(f"attention width {width} is not a multiple of the head size {HEAD_DIM}")
        self.eps = eps
        self.qkv = nn.Conv2d(width, 3 * width, 1, bias=False)
        self.proj = nn.Conv2d(width, width, 1, bias=False)
        self.norm = RMSNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # (B, 3C, H, W) -> (B, heads, 3 * HEAD_DIM, H*W): each head's channels are its q, then k, then v
        qkv = self.qkv(x).float().reshape(b, c // HEAD_DIM, 3 * HEAD_DIM, h * w)
        q, k, v = qkv.split(HEAD_DIM, dim=2)  # each (B, heads, D, N)
        q, k = F.relu(q), F.relu(k)
        # The published code switches to the quadratic form k^T q when H*W <= 32; the two are the same sum.
        kv = v @ k.transpose(-1, -2)  # (B, heads, D, D)
        numerator = kv @ q  # (B, heads, D, N)
        denominator = k.sum(dim=-1, keepdim=True).transpose(-1, -2) @ q  # (B, heads, 1, N)
        out = (numerator / (denominator + self.eps)).to(x.dtype)
        out = out.reshape(b, c, h, w)  # (B, heads, D, N) -> (B, C, H, W)
        return self.norm(self.proj(out))


class GatedConvMLP(nn.Module):
    """EfficientViT's GLUMBConv: expand (SiLU), depthwise 3x3, half gates the other half through a SiLU,
    project back and normalize."""

    def __init__(self, width: int) -> None:
        super().__init__()
        hidden = GLU_EXPANSION * width
        self.expand = nn.Conv2d(width, 2 * hidden, 1)
        self.depthwise = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden)
        self.project = nn.Conv2d(hidden, width, 1, bias=False)
        self.norm = RMSNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.depthwise(F.silu(self.expand(x))).chunk(2, dim=1)
        return self.norm(self.project(value * F.silu(gate)))


class AttentionBlock(nn.Module):
    """x + attn(x), then + mlp(x): an EfficientViT block with a gated conv MLP."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.attn = LinearAttention(width)
        self.mlp = GatedConvMLP(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.mlp(x)


class Downsample(nn.Module):
    """2x smaller, `cin` -> `cout` channels: a conv to cout / 4 and a pixel-unshuffle, plus (shortcut) the
    pixel-unshuffled input averaged down to cout channels."""

    def __init__(self, cin: int, cout: int, shortcut: bool = True) -> None:
        super().__init__()
        if cout % 4 or (shortcut and (4 * cin) % cout):
            raise ValueError(f"cannot downsample {cin} to {cout} channels: needs 4 | cout and cout | 4 cin")
        self.cout = cout
        self.shortcut = shortcut
        self.conv = nn.Conv2d(cin, cout // 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.pixel_unshuffle(self.conv(x), 2)  # (B, cout / 4, H, W) -> (B, cout, H / 2, W / 2)
        if self.shortcut:
            out = out + channel_average(F.pixel_unshuffle(x, 2), self.cout)
        return out


class Stage(nn.Module):
    def __init__(self, width: int, depth: int, attention: bool, next_width: int | None) -> None:
        super().__init__()
        block = AttentionBlock if attention else ResBlock
        self.blocks = nn.ModuleList(block(width) for _ in range(depth))
        self.down = Downsample(width, next_width) if next_width is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.down(x) if self.down is not None else x


class DCAEEncoder(nn.Module):
    """Image in [-1, 1], (B, 3, H, W) -> latent after quant_conv (B, C, H/f, W/f), f = config.downsample."""

    def __init__(self, config: MGVQConfig) -> None:
        super().__init__()
        widths, depths = config.stage_widths, config.stage_depths
        n = len(widths)
        self.latent_channels = c = config.latent_channels
        if widths[-1] % c:
            raise ValueError(f"the last stage's width {widths[-1]} is not a multiple of {c} latent channels")
        self.stem = Downsample(3, widths[0], shortcut=False)
        self.stages = nn.ModuleList(
            Stage(
                widths[i],
                depths[i],
                attention=i >= n - config.attention_stages,
                next_width=widths[i + 1] if i + 1 < n else None,
            )
            for i in range(n)
        )
        self.head = nn.Conv2d(widths[-1], c, 3, padding=1)
        self.quant_conv = nn.Conv2d(c, c, 1, groups=config.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        x = self.head(x) + channel_average(x, self.latent_channels)
        return self.quant_conv(x)
