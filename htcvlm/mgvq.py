"""MGVQ: a multi-group vector-quantized image tokenizer (the discrete channel's Q in Eq. 4).

An encoder (the small conv stack trained here, or the published DC-AE style one of htcvlm/mgvq_dcae.py)
reduces the image by `downsample`; the latent's channels are split into G groups and each group vector is
matched by cosine nearest neighbour against its own slice of one shared codebook. The quantized latent,
flattened, is q (32 x 21 x 21 = 14112 values at 336 px). With the conv encoder, a conv decoder reconstructs
the image so the tokenizer can be trained on reconstruction + commitment loss (stage 1).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from htcvlm.config import MGVQConfig
from htcvlm.mgvq_dcae import DCAEEncoder

logger = logging.getLogger(__name__)


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor  # (B, C, h, w), straight-through: gradients flow to the encoder
    indices: torch.Tensor  # (B, G, h, w) code index within each group's slice
    loss: torch.Tensor  # codebook + beta * commitment, scalar


class MultiGroupQuantizer(nn.Module):
    def __init__(self, config: MGVQConfig) -> None:
        super().__init__()
        self.groups = config.groups
        self.group_dim = config.latent_channels // config.groups
        self.codes_per_group = config.codebook_size // config.groups
        self.beta = config.commitment
        # One codebook; group g owns rows [g * codes_per_group, (g + 1) * codes_per_group).
        self.codebook = nn.Parameter(torch.randn(config.codebook_size, self.group_dim))

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        b, c, h, w = z.shape
        # (B, C, h, w) -> (B, h, w, G, c_g): one vector per group per position
        zg = z.permute(0, 2, 3, 1).reshape(b, h, w, self.groups, self.group_dim)
        zg = F.normalize(zg, dim=-1)
        # (G, K_g, c_g): each group's slice of the codebook, unit length so that dot product = cosine
        codes = F.normalize(self.codebook, dim=-1).view(self.groups, self.codes_per_group, self.group_dim)
        sim = torch.einsum("bhwgc,gkc->bhwgk", zg, codes)
        idx = sim.argmax(dim=-1)  # (B, h, w, G)
        chosen = codes[torch.arange(self.groups, device=z.device), idx]  # (B, h, w, G, c_g)
        loss = F.mse_loss(chosen, zg.detach()) + self.beta * F.mse_loss(zg, chosen.detach())
        st = zg + (chosen - zg).detach()  # straight-through estimator
        # (B, h, w, G, c_g) -> (B, C, h, w)
        quantized = st.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()
        return QuantizerOutput(quantized, idx.permute(0, 3, 1, 2), loss)


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(_groups(cout), cout), nn.SiLU())


def _groups(channels: int) -> int:
    return next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)


def _conv_encoder(config: MGVQConfig, widths: list[int]) -> nn.Sequential:
    # No conv block runs at full resolution: the first layer already halves the image. Full-resolution
    # blocks cost most of the FLOPs and little quality for a tokenizer this coarse.
    enc: list[nn.Module] = [nn.Conv2d(3, widths[0], 4, stride=2, padding=1)]
    for i in range(len(widths) - 1):
        enc += [_block(widths[i], widths[i]), nn.Conv2d(widths[i], widths[i + 1], 4, stride=2, padding=1)]
    enc += [_block(widths[-1], widths[-1]), nn.Conv2d(widths[-1], config.latent_channels, 1)]
    return nn.Sequential(*enc)


def _conv_decoder(config: MGVQConfig, widths: list[int]) -> nn.Sequential:
    dec: list[nn.Module] = [nn.Conv2d(config.latent_channels, widths[-1], 3, padding=1)]
    for i in reversed(range(1, len(widths))):
        dec += [
            _block(widths[i], widths[i]),
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(widths[i], widths[i - 1], 3, padding=1),
        ]
    dec += [_block(widths[0], widths[0]), nn.ConvTranspose2d(widths[0], 3, 4, stride=2, padding=1)]
    return nn.Sequential(*dec)


class MGVQ(nn.Module):
    """Image in [0, 1], (B, 3, S, S) -> quantized latent (B, C, S/f, S/f) and back.

    `config.encoder` picks the encoder: "conv", the small conv stack trained here with its decoder, or
    "dcae", the published MGVQ encoder (htcvlm/mgvq_dcae.py) loaded from MGVQ's checkpoints; its decoder is
    not built, as OneToken only encodes with it. Both encoders take [-1, 1]; encode() converts.
    """

    def __init__(self, config: MGVQConfig) -> None:
        super().__init__()
        self.config = config
        stages = config.downsample.bit_length() - 1  # log2(downsample) stride-2 stages
        widths = [config.base_channels * min(2**i, 4) for i in range(stages)]
        self.encoder = DCAEEncoder(config) if config.encoder == "dcae" else _conv_encoder(config, widths)
        self.quantizer = MultiGroupQuantizer(config)
        self.decoder: nn.Module | None = _conv_decoder(config, widths) if config.encoder == "conv" else None

    def encode(self, pixels: torch.Tensor) -> QuantizerOutput:
        return self.quantizer(self.encoder(pixels * 2 - 1))  # both encoders work on [-1, 1]

    def decode(self, quantized: torch.Tensor) -> torch.Tensor:
        if self.decoder is None:
            raise ValueError(f"the {self.config.encoder!r} MGVQ encoder has no decoder here: it only encodes")
        return (self.decoder(quantized) + 1) / 2

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        """Reconstruction (B, 3, S, S) and the quantizer's output, for stage-1 training."""
        out = self.encode(pixels)
        return self.decode(out.quantized), out

    def loss(self, pixels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        recon, out = self(pixels)
        rec = F.mse_loss(recon, pixels)
        return rec + out.loss, {"reconstruction": rec.item(), "commitment": out.loss.item()}
