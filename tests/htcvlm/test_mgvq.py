"""The multi-group quantizer and the MGVQ tokenizer."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from htcvlm.config import MGVQConfig
from htcvlm.mgvq import MGVQ, MultiGroupQuantizer

CFG = MGVQConfig(downsample=4, latent_channels=8, groups=4, codebook_size=32, base_channels=8)


def test_each_group_matches_its_own_codebook_slice_by_cosine():
    torch.manual_seed(0)
    quant = MultiGroupQuantizer(CFG)
    z = torch.randn(2, 8, 3, 3)
    out = quant(z)
    assert out.indices.shape == (2, 4, 3, 3) and out.indices.max() < 8
    codes = F.normalize(quant.codebook, dim=-1).view(4, 8, 2)
    for g in range(4):
        vec = F.normalize(z[0, 2 * g : 2 * g + 2, 1, 2], dim=0)
        best = (codes[g] @ vec).argmax()
        assert out.indices[0, g, 1, 2] == best
        assert torch.allclose(out.quantized[0, 2 * g : 2 * g + 2, 1, 2], codes[g, best], atol=1e-6)


def test_scaling_a_group_vector_does_not_change_its_code():
    quant = MultiGroupQuantizer(CFG)
    z = torch.randn(1, 8, 2, 2)
    assert torch.equal(quant(z).indices, quant(z * 7.5).indices)


def test_straight_through_gradient_reaches_the_encoder_and_codebook():
    model = MGVQ(CFG)
    pixels = torch.rand(2, 3, 16, 16)
    loss, parts = model.loss(pixels)
    loss.backward()
    assert model.encoder[0].weight.grad.abs().sum() > 0, "straight-through estimator passes gradients"
    assert model.quantizer.codebook.grad.abs().sum() > 0, "codebook loss trains the codes"
    assert set(parts) == {"reconstruction", "commitment"}


def test_shapes_follow_the_downsampling():
    model = MGVQ(MGVQConfig(downsample=16, base_channels=8))
    recon, out = model(torch.rand(1, 3, 336, 336))
    assert out.quantized.shape == (1, 32, 21, 21)  # q = 32 x 21 x 21 = 14112 values
    assert recon.shape == (1, 3, 336, 336)


def test_a_few_steps_reduce_reconstruction_loss():
    torch.manual_seed(0)
    model = MGVQ(CFG)
    pixels = torch.rand(4, 3, 16, 16)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = model.loss(pixels)[1]["reconstruction"]
    for _ in range(40):
        opt.zero_grad()
        model.loss(pixels)[0].backward()
        opt.step()
    assert model.loss(pixels)[1]["reconstruction"] < 0.7 * first
