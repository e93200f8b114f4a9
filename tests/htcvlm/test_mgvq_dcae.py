"""The published MGVQ encoder (mgvq_dcae.py) and the config setting that selects it.

That it reproduces MGVQ's own encoder, number for number, is tested with golden tensors in
tests/htcvlm/formats/test_mgvq.py; here: its parts against their definitions, its shapes, and that the new
setting leaves every existing config and fingerprint as it was.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from htcvlm.config import HTCConfig, MGVQConfig
from htcvlm.mgvq import MGVQ
from htcvlm.mgvq_dcae import HEAD_DIM, DCAEEncoder, LinearAttention, RMSNorm2d
from tests.htcvlm.helpers import SMALL_DCAE

SMALL = SMALL_DCAE


def test_a_config_without_the_encoder_setting_is_the_conv_encoder_and_writes_none_of_it():
    tiny = HTCConfig.from_name("tiny")
    saved = json.loads(tiny.to_json())
    assert tiny.mgvq.encoder == "conv"
    assert not {"encoder", "stage_widths", "stage_depths", "attention_stages"} & saved["mgvq"].keys()
    assert HTCConfig.from_dict(saved) == tiny  # a config.json written before the setting existed


def test_dcae_settings_round_trip_through_json():
    config = HTCConfig.from_name("tiny", mgvq=SMALL)
    saved = json.loads(config.to_json())
    assert saved["mgvq"]["encoder"] == "dcae"
    assert saved["mgvq"]["stage_widths"] == [16, 32, 32, 64]
    assert "attention_stages" not in saved["mgvq"], "a new setting at its default is left out"
    assert HTCConfig.from_dict(saved) == config  # JSON lists come back as tuples


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"encoder": "vit"}, "encoder must be one of"),
        ({"downsample": 32}, "4 stages downsample by 16, not 32"),
        ({"stage_depths": (2, 2, 2)}, "differ"),
        ({"stage_depths": (2, 0, 2, 1)}, "every stage needs a block"),
        ({"attention_stages": 5}, "attention_stages 5 not within 0..4"),
    ],
)
def test_inconsistent_dcae_settings_are_refused_naming_the_values(changes, message):
    fields = {**SMALL.__dict__, **changes}
    with pytest.raises(ValueError, match=message):
        MGVQConfig(**fields)


def test_widths_the_published_blocks_cannot_take_are_refused():
    with pytest.raises(ValueError, match="attention width 16 is not a multiple of the head size 32"):
        DCAEEncoder(MGVQConfig(**{**SMALL.__dict__, "stage_widths": (16, 32, 16, 64)}))
    with pytest.raises(ValueError, match="last stage's width 64 is not a multiple of 24 latent channels"):
        DCAEEncoder(
            MGVQConfig(**{**SMALL.__dict__, "latent_channels": 24, "groups": 4, "codebook_size": 256})
        )


def test_the_published_encoder_reduces_by_the_downsample_and_quantizes_per_group():
    torch.manual_seed(0)
    model = MGVQ(SMALL).eval()
    with torch.no_grad():
        out = model.encode(torch.rand(2, 3, 64, 48))
    assert out.quantized.shape == (2, 16, 4, 3)
    assert out.indices.shape == (2, 4, 4, 3) and int(out.indices.max()) < 64
    # every group vector of the output is a unit-length codebook row
    groups = out.quantized.view(2, 4, 4, 4, 3)  # (B, G, c_g, h, w)
    assert torch.allclose(groups.norm(dim=2), torch.ones(2, 4, 4, 3), atol=1e-5)


def test_the_default_dcae_settings_give_the_papers_q_at_336_px():
    config = HTCConfig.from_name("paper", mgvq=MGVQConfig(encoder="dcae"))
    with torch.device("meta"):  # shapes only: the full-size encoder has 87 M parameters
        out = MGVQ(config.mgvq).encode(torch.empty(1, 3, 336, 336))
    assert (
        out.quantized.shape == (1, 32, 21, 21) and out.quantized.flatten(1).shape[1] == config.q_dim == 14112
    )
    assert out.indices.shape == (1, 8, 21, 21)


def test_the_published_encoder_has_no_decoder_here():
    model = MGVQ(SMALL)
    assert model.decoder is None
    with pytest.raises(ValueError, match="'dcae' MGVQ encoder has no decoder"):
        model.loss(torch.rand(1, 3, 32, 32))


def test_rms_norm_is_torchs_rms_norm_over_channels_plus_a_bias():
    torch.manual_seed(0)
    norm = RMSNorm2d(8)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 8, 3, 5) * 3
    expected = (
        F.rms_norm(x.movedim(1, -1), (8,), norm.weight, norm.eps).movedim(-1, 1) + norm.bias[:, None, None]
    )
    assert torch.allclose(norm(x), expected, atol=1e-6)


def test_linear_attention_is_relu_attention_normalized_over_keys():
    """The linear form against the quadratic one written out: each position's output is the values
    weighted by relu(k_m) . relu(q_n), divided by the sum of those weights (per head)."""
    torch.manual_seed(0)
    attn = LinearAttention(2 * HEAD_DIM).eval()
    x = torch.randn(1, 2 * HEAD_DIM, 3, 4)
    qkv = attn.qkv(x).view(1, 2, 3 * HEAD_DIM, 12)  # (B, heads, q|k|v, N)
    heads = []
    for h in range(2):
        q, k, v = qkv[0, h].split(HEAD_DIM)  # each (D, N)
        weights = F.relu(k).T @ F.relu(q)  # (N keys, N queries)
        heads.append(v @ (weights / weights.sum(dim=0, keepdim=True)))  # (D, N)
    expected = attn.norm(attn.proj(torch.cat(heads).view(1, 2 * HEAD_DIM, 3, 4)))
    with torch.no_grad():
        assert torch.allclose(attn(x), expected, atol=1e-5)
