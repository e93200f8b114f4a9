"""Reading MGVQ's published tokenizer checkpoints, checked against MGVQ's own code.

How the test data in tests/htcvlm/fixtures/ was made (MGVQ's code is not in this repository; it was run
outside it, on the CPU):

- Source: github.com/MKJia/MGVQ at commit f76c2dd5f28084e69b73dc1fcd0617639c5ffe82, module
  efficientvit/models/tokenizer/mgvq.py (classes MGVQ, Encoder, VectorQuantizer; blocks from
  efficientvit/models/nn/ops.py). Its one CUDA-only piece, the Triton RMSNorm kernel (TritonRMSNorm2d),
  was replaced by torch.nn.functional.rms_norm over the channels plus the bias; `triton` was stubbed so
  the modules import. Nothing else was changed.
- mgvq_published_tiny.safetensors: `MGVQ(cfg)` built as `mgvq_f16c32` builds it (same block types, norms,
  activations, downsampling, shortcuts) but small: latent_channels=16, codebook_size=256,
  codebook_groups=4, encoder.width_list=[8,16,32,32,64], encoder.depth_list=[0,2,2,2,1],
  decoder.width_list=[4,8,8,32,32], decoder.depth_list=[0,1,1,1,1]. Weights: torch.manual_seed(12) and
  the default initialisation, norm scales 1 + 0.2 N(0, 1) and biases 0.2 N(0, 1), codebook N(0, 1),
  embed_prob and BatchNorm statistics uniform; then every float rounded to float16, so "state.<key>"
  stores each weight exactly in half the bytes (the reference ran on those values in float32).
  `quantize.codebook_used` (4 x 65536, a training usage counter) is left out and rebuilt here as zeros.
  Input "pixels": torch.manual_seed(5), uint8 (2, 3, 64, 64); MGVQ was fed pixels / 255 * 2 - 1, as its
  eval_recon.py does. Outputs, in eval mode under no_grad: "encoder_out" = model.encoder(x), "latent" =
  model.quant_conv(encoder_out) (what the quantizer matches), "quantized" and the code indices from
  model.quantize(latent); its (B*h*w, G) indices were stored as "indices" (B, G, h, w), OneToken's
  layout. The smallest margin between the best and second-best cosine is 2.7e-3, so the indices are no
  near-tie. At 64 px the last stage's 4 x 4 positions take MGVQ's quadratic attention path and the stage
  before its linear one: both are covered.
- mgvq_f16c32_g8_shapes.json: every key and shape of `MGVQ(mgvq_f16c32("mgvq-f16c32", None, 16384, 8))`,
  the paper's tokenizer (mgvq_f16c32_g8.pt), at full size.
"""

from __future__ import annotations

import argparse
import io
import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from htcvlm.config import MGVQConfig
from htcvlm.errors import CheckpointError
from htcvlm.formats.mgvq import from_published, load_mgvq, read_mgvq
from htcvlm.images import pixels_from_bytes
from htcvlm.record import image_id_of
from tests.htcvlm.helpers import SMALL_DCAE, make_model, png_bytes

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
GOLDEN = FIXTURES / "mgvq_published_tiny.safetensors"
EXPECTED = SMALL_DCAE  # the geometry the golden tensors were made at


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(str(GOLDEN))


@pytest.fixture
def published(golden) -> dict[str, torch.Tensor]:
    """The golden weights as MGVQ's own state dict (float32, every key of its layout)."""
    state = {k.removeprefix("state."): v.float() if v.is_floating_point() else v for k, v in golden.items()}
    state = {
        k: v for k, v in state.items() if k not in ("pixels", "encoder_out", "latent", "quantized", "indices")
    }
    state["quantize.codebook_used"] = torch.zeros(4, 65536)
    return state


def save(obj: object, tmp_path: Path) -> Path:
    path = tmp_path / "mgvq.pt"
    torch.save(obj, path)
    return path


def pixels(golden) -> torch.Tensor:
    return golden["pixels"].float() / 255  # OneToken's [0, 1]; MGVQ.encode makes them MGVQ's [-1, 1]


@pytest.mark.parametrize("wrapper", ["model", "state_dict", None])
def test_a_published_checkpoint_loads_strictly_with_its_geometry_read_off_the_tensors(
    published, tmp_path, wrapper
):
    path = save({wrapper: published, "steps": 1000} if wrapper else published, tmp_path)
    config, state = read_mgvq(path)
    assert config == EXPECTED
    assert torch.equal(state["encoder.head.bias"], published["encoder.project_out.main.op_list.0.conv.bias"])
    model = load_mgvq(path)
    assert model.config == EXPECTED and not model.training
    assert torch.equal(model.quantizer.codebook, published["quantize.embedding.weight"])
    assert torch.equal(model.encoder.quant_conv.weight, published["quant_conv.weight"])


def test_the_encoder_reproduces_mgvqs_latents_and_code_indices(golden, published, tmp_path):
    model = load_mgvq(save({"model": published}, tmp_path))
    with torch.no_grad():
        latent = model.encoder(pixels(golden) * 2 - 1)
        out = model.encode(pixels(golden))
    assert latent.shape == golden["latent"].shape == (2, 16, 4, 4)
    assert torch.allclose(latent, golden["latent"], atol=1e-5, rtol=0)
    assert torch.equal(out.indices, golden["indices"])
    assert torch.allclose(out.quantized, golden["quantized"], atol=1e-6)


def test_the_quantizer_picks_mgvqs_codes_from_mgvqs_own_latent(golden, published, tmp_path):
    """The codebook mapping and cosine lookup alone, free of any encoder difference."""
    model = load_mgvq(save({"model": published}, tmp_path))
    with torch.no_grad():
        out = model.quantizer(golden["latent"])
    assert torch.equal(out.indices, golden["indices"])
    assert torch.allclose(out.quantized, golden["quantized"], atol=1e-6)


def test_the_papers_published_tokenizer_maps_onto_the_default_dcae_geometry():
    shapes = json.loads((FIXTURES / "mgvq_f16c32_g8_shapes.json").read_text())
    state = {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}
    config, mapped = from_published(state)
    assert config == MGVQConfig(encoder="dcae")  # f16, 32 channels, 8 groups, 16384 codes of 4 dims
    encoder = sum(v.numel() for k, v in mapped.items() if k.startswith("encoder."))
    published_encoder = sum(torch.Size(s).numel() for k, s in shapes.items() if k.startswith("encoder."))
    assert encoder == published_encoder + 32 * 4 + 32  # their encoder, and quant_conv now inside ours


def test_an_unknown_key_is_refused_by_name(published, tmp_path):
    published["encoder.stages.1.op_list.0.main.conv3.conv.weight"] = torch.zeros(16, 16, 3, 3)
    with pytest.raises(CheckpointError, match=r"encoder\.stages\.1\.op_list\.0\.main\.conv3\.conv\.weight"):
        read_mgvq(save({"model": published}, tmp_path))


@pytest.mark.parametrize(
    "key",
    [
        "encoder.stages.3.op_list.1.local_module.main.point_conv.norm.bias",
        "encoder.stages.2.op_list.2.main.conv.conv.weight",
        "quant_conv.bias",
    ],
)
def test_a_missing_key_is_refused_by_its_published_name(published, tmp_path, key):
    del published[key]
    with pytest.raises(CheckpointError, match=rf"missing \[{re.escape(key)}\]"):
        read_mgvq(save({"model": published}, tmp_path))


def test_a_missing_codebook_is_refused_by_name(published, tmp_path):
    del published["quantize.embedding.weight"]
    with pytest.raises(CheckpointError, match=r"lacks quantize\.embedding\.weight"):
        read_mgvq(save({"model": published}, tmp_path))


def test_a_tensor_of_the_wrong_shape_is_refused_by_name(published, tmp_path):
    published["encoder.project_out.main.op_list.0.conv.bias"] = torch.zeros(17)
    with pytest.raises(
        CheckpointError, match=r"project_out\.main\.op_list\.0\.conv\.bias \(17,\) != \(16,\)"
    ):
        read_mgvq(save({"model": published}, tmp_path))


def test_a_block_out_of_place_is_refused(published, tmp_path):
    # a residual block's weights where the attention stages are
    for name in ("conv1.conv.weight", "conv1.conv.bias"):
        published[f"encoder.stages.4.op_list.1.main.{name}"] = published[
            f"encoder.stages.1.op_list.0.main.{name}"
        ]
    with pytest.raises(CheckpointError, match="stage 4 mixes residual and attention blocks"):
        read_mgvq(save({"model": published}, tmp_path))


def test_a_checkpoint_with_pickled_objects_is_not_unpickled(published, tmp_path):
    path = save({"model": published, "args": argparse.Namespace(vq_model="mgvq-f16c32")}, tmp_path)
    with pytest.raises(CheckpointError, match="not unpickled"):
        read_mgvq(path)


def test_a_missing_or_broken_file_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_mgvq(tmp_path / "absent.pt")
    (tmp_path / "broken.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError):
        read_mgvq(tmp_path / "broken.pt")


def test_htcvlm_with_the_published_encoder_compresses_end_to_end(golden, published, tmp_path, tokenizer):
    config, state = read_mgvq(save({"model": published}, tmp_path))
    model = make_model(tokenizer, image_size=64, mgvq=config)
    model.mgvq.load_state_dict(state, strict=True)
    # The golden image as a PNG file, through compress()'s own decoding: lossless, so the same pixels.
    image = png_from_uint8(golden["pixels"][0])
    assert torch.equal(pixels_from_bytes(image, 64), pixels(golden)[0])
    records = model.compress([image, png_bytes(1)])
    assert [r.image_id for r in records] == [image_id_of(image), image_id_of(png_bytes(1))]
    assert records[0].keys.shape == (3, 2, 1, 16)  # (layers, kv heads, n_voco, head_dim)
    assert torch.isfinite(records[0].latent).all() and not torch.equal(records[0].latent, records[1].latent)
    with torch.no_grad():
        # compress()'s anchors v_d are P_d of MGVQ's own quantized latent q
        v_d, _ = model.discrete_tokens(pixels(golden)[:1])
        expected = model.proj_d(golden["quantized"][:1].flatten(1))
    assert torch.allclose(v_d, expected, atol=1e-5)


def png_from_uint8(chw: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(chw.permute(1, 2, 0).numpy()).save(buf, format="PNG")  # (3, H, W) -> (H, W, 3)
    return buf.getvalue()
