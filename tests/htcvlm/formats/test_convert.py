"""`onetoken convert`: published LLaVA-1.5 / VoCo-LLaMA (/ MGVQ) checkpoints -> OneToken checkpoint folders
that compute what the published models compute, in their own token layouts.

Token ids of the references come from sentencepiece itself, tokenizing as the published code did:
LLaVA-1.5's `tokenizer_image_token` (each side of `<image>` encoded on its own, the second without its
BOS) and VoCo-LLaMA's, whose text after `<voco>` was encoded by transformers 4.37's slow LlamaTokenizer
with `legacy: false` (no dummy prefix there, so "\\n" not "▁" "\\n").
"""

from __future__ import annotations

import dataclasses
import io
import json
import shutil

import pytest
import sentencepiece as spm
import skimage.data
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import LlavaImageProcessorPil
from transformers.convert_slow_tokenizer import import_protobuf

from htcvlm.checkpoint import load_pretrained, save_pretrained
from htcvlm.config import ImageProcessing
from htcvlm.data.dataset import ProceduralVQA
from htcvlm.decode import DecodeBatch, decode
from htcvlm.errors import CheckpointError
from htcvlm.formats.convert import VICUNA_SYSTEM, convert_llava, convert_voco_llama
from htcvlm.formats.mgvq import read_mgvq
from htcvlm.formats.voco_llama import SYSTEM as VOCO_SYSTEM
from htcvlm.formats.weights import load_weights
from htcvlm.generation import GenerationOptions
from htcvlm.images import pixels_from_bytes
from htcvlm.mask import to_additive
from htcvlm.pool import tensorize
from tests.htcvlm.formats.published import IMAGE_SIZE, Published, publish, write_voco_llama
from tests.htcvlm.formats.test_mgvq import GOLDEN
from tests.htcvlm.helpers import sharpened

VOCAB, IMAGE = 400, -200  # IMAGE: LLaVA's placeholder id for the image tokens
QUESTIONS = ["What is in the image?", "How many cats are there? ", "Über 2 naïve cafés"]


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Published:
    return publish(tmp_path_factory.mktemp("published"))


@pytest.fixture(scope="module")
def voco_llama_dir(published, tmp_path_factory):
    return write_voco_llama(tmp_path_factory.mktemp("voco") / "voco-llama", published.original, VOCAB)


def written(converted, tmp_path, name: str):
    return load_pretrained(save_pretrained(converted.model, tmp_path / name))


def photo(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def processor(sp_model: bytes, dummy_prefix: bool) -> spm.SentencePieceProcessor:
    proto = import_protobuf().ModelProto()
    proto.ParseFromString(sp_model)
    proto.normalizer_spec.add_dummy_prefix = dummy_prefix
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


def llava_ids(sp_model: bytes, question: str, n_patches: int) -> list[int]:
    """LLaVA-1.5's input ids for conv_vicuna_v1's "{system} USER: <image>\\n{question} ASSISTANT:"."""
    sp = processor(sp_model, dummy_prefix=True)
    before, after = f"{VICUNA_SYSTEM} USER: ", f"\n{question.strip()} ASSISTANT:"
    return [sp.bos_id(), *sp.encode(before), *[IMAGE] * n_patches, *sp.encode(after)]


def voco_llama_ids(sp_model: bytes, question: str, n_patches: int, legacy: bool = False) -> list[int]:
    """VoCo-LLaMA's input ids for "<image>\\n<voco><voco>\\n{system} USER: {question} ASSISTANT:". The
    chunk after <image> is split at <voco>; LlamaTokenizer 4.37 with legacy false first puts "▁" in front
    of it and encodes each piece without the dummy prefix, a piece starting with "▁" after an "<unk>" that
    is then dropped; with legacy true each piece is encoded as sentencepiece does, dummy prefix and all."""
    sp = processor(sp_model, dummy_prefix=legacy)
    unk = len(sp.encode("<unk>"))
    ids = [sp.bos_id(), *[IMAGE] * n_patches]
    chunk = f"\n<voco><voco>\n{VOCO_SYSTEM} USER: {question.strip()} ASSISTANT:"
    for i, piece in enumerate((chunk if legacy else "▁" + chunk).split("<voco>")):
        ids += [VOCAB] if i else []
        if piece and not legacy and piece.startswith("▁"):
            ids += sp.encode("<unk>" + piece)[unk:]
        elif piece:
            ids += sp.encode(piece)
    return ids


def our_ids(model, question: str) -> list[int]:
    """Our layout's whole sequence, image and voco positions marked as the references mark them."""
    layout = model.layout
    return [
        *layout.shared_ids,
        *[IMAGE] * layout.n_visual,
        *layout.separator_ids,
        *[VOCAB] * layout.n_voco,
        *model.prompt_ids(question),
    ]


# ---- LLaVA-1.5 ----


@pytest.fixture(scope="module")
def llava_hf(published, tmp_path_factory):
    return written(convert_llava(published.hf, dtype="fp32"), tmp_path_factory.mktemp("hf"), "out")


def test_the_llava_layout_is_llavas_own_tokenization(published, llava_hf):
    for question in QUESTIONS:
        n = llava_hf.config.n_patches
        expected = llava_ids(published.sp_model, question, n)
        got = our_ids(llava_hf, question)
        assert got[: llava_hf.layout.voco_position] + got[llava_hf.layout.text_position :] == expected
    assert llava_hf.stop_ids == {2} and llava_hf.config.layout.stop_tokens == ("</s>",)
    assert llava_hf.config.preprocess == ImageProcessing(True, (122, 116, 104), "shortest_edge")


CONVERSATION = (
    ("What is in the image?", "A cat sitting on a red mat."),
    ("How many dogs?", "There are 2 dogs"),
    ("Über naïve?", "résumé 12"),
)


def llava_v1_reference(sp_model: bytes, turns, n_patches: int) -> tuple[list[int], list[bool]]:
    """LLaVA-1.5's training row of a conversation, as its `preprocess_v1` makes it: conv_vicuna_v1's
    "{system} USER: <image>\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>…" tokenized by
    `tokenizer_image_token` (each side of <image> on its own, every text between special tokens encoded by
    sentencepiece with its dummy prefix, as the slow LlamaTokenizer of LLaVA's pinned transformers 4.31
    did), and its labels: per round split at "</s>", the instruction up to "ASSISTANT: " masked
    (`len(tokenize(instruction)) - 2`: its BOS and the lone "▁" of its trailing space). Returns the ids
    with <image> as n_patches IMAGE ids, and which of them are labels."""
    sp = processor(sp_model, dummy_prefix=True)

    def tokenize(text: str) -> list[int]:  # tokenizer(text).input_ids: BOS, "</s>" a special token
        ids = [sp.bos_id()]
        for k, piece in enumerate(text.split("</s>")):
            ids += ([sp.eos_id()] if k else []) + (sp.encode(piece) if piece else [])
        return ids

    def tokenize_image(text: str) -> list[int]:  # tokenizer_image_token: <image> is one IMAGE id
        before, _, after = text.partition("<image>")
        return tokenize(before) + ([IMAGE, *tokenize(after)[1:]] if _ else [])

    (q1, a1), *later = turns
    conversation = f"{VICUNA_SYSTEM} USER: <image>\n{q1.strip()} ASSISTANT: {a1}</s>"
    conversation += "".join(f"USER: {q.strip()} ASSISTANT: {a}</s>" for q, a in later)
    ids = tokenize_image(conversation)
    labels = [True] * len(ids)
    labels[0], at = False, 1
    for round_ in conversation.split("</s>")[:-1]:
        instruction = round_.split(" ASSISTANT: ")[0] + " ASSISTANT: "
        n = len(tokenize_image(instruction)) - 2
        labels[at : at + n] = [False] * n
        at += len(tokenize_image(round_))
    assert at == len(ids)  # LLaVA's own check ("tokenization mismatch" else, and the row left unscored)
    image = ids.index(IMAGE)
    return ids[:image] + [IMAGE] * n_patches + ids[image + 1 :], labels[:image] + [
        False
    ] * n_patches + labels[image + 1 :]


def packed_row(model, turns) -> tuple[list[int], list[bool]]:
    """Our training row of the conversation (`tensorize`), image and voco positions marked as above."""
    sample = ProceduralVQA("train", 1)[0]
    (q1, a1), *later = turns
    row = tensorize(model, [dataclasses.replace(sample, question=q1, answer=a1, follow_ups=tuple(later))])
    n = int(row.lengths[0])
    prefix = [*model.layout.shared_ids, *[IMAGE] * model.layout.n_visual, *model.layout.separator_ids]
    ids = prefix + [VOCAB] * model.layout.n_voco + row.ids[0, :n].tolist()
    return ids, [False] * (len(ids) - n) + row.scored[0, :n].tolist()


def test_a_packed_llava_conversation_is_llavas_training_row(published, llava_hf, tmp_path):
    """Every turn of a conversation packed after the compressed image has the token ids and the scored
    tokens of LLaVA-1.5's own training row (`preprocess_v1`), the voco token between image and text
    aside: the answers start with "▁A", not "▁" "▁A" as " A" alone tokenizes, and each later turn's
    "USER: " follows the "</s>" before it."""
    original = written(convert_llava(published.original, published.clip, dtype="fp32"), tmp_path, "o")
    for model in (llava_hf, original):
        ids, scored = packed_row(model, CONVERSATION)
        voco = model.layout.voco_position
        expected_ids, expected_labels = llava_v1_reference(
            published.sp_model, CONVERSATION, model.config.n_patches
        )
        assert ids[:voco] + ids[voco + model.layout.n_voco :] == expected_ids
        assert scored[:voco] + scored[voco + model.layout.n_voco :] == expected_labels
        tokens = model.tokenizer.convert_ids_to_tokens([i if i >= 0 else 0 for i in ids])
        firsts = [tokens[i] for i in range(1, len(ids)) if scored[i] and not scored[i - 1]]
        assert firsts == ["▁A", "▁The", "▁"]  # "▁" "ré": the vocabulary has no "▁ré"


def test_converted_llava_without_the_bottleneck_equals_transformers_llava(published, llava_hf):
    """The converted folder, run uncompressed (text reading every image token, plain causal attention,
    no voco), gives LlavaForConditionalGeneration's logits on the same image file and question; ours
    through OneToken's preprocessing of the file, transformers' through its own processor."""
    model, theirs_model = llava_hf, published.model
    transformers_processor = LlavaImageProcessorPil(
        do_pad=True,
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    for array, question in zip(
        (skimage.data.coffee(), skimage.data.rocket()[:, 100:400]), QUESTIONS[:2], strict=True
    ):
        data = photo(array)
        pixels = pixels_from_bytes(data, IMAGE_SIZE, processing=model.config.preprocess)
        reference_pixels = transformers_processor(Image.open(io.BytesIO(data)), return_tensors="pt")
        ids = llava_ids(published.sp_model, question, model.config.n_patches)
        layout = model.layout
        with torch.no_grad():
            hf_ids = torch.tensor([[theirs_model.config.image_token_id if i == IMAGE else i for i in ids]])
            theirs = theirs_model(input_ids=hf_ids, pixel_values=reference_pixels.pixel_values).logits
            embeds = torch.cat(
                [
                    model.embed_text(torch.tensor([layout.shared_ids])),
                    model.continuous_tokens(pixels[None]),
                    model.embed_text(torch.tensor([model.prompt_ids(question)])),
                ],
                dim=1,
            )
            ours = model.llm(inputs_embeds=embeds).logits
        assert ours.shape[1] == len(ids)
        err = (ours[0, -1] - theirs[0, -1, :VOCAB]).abs().max().item()
        assert err <= 1e-4, f"next-token logits differ by {err}"
        torch.testing.assert_close(ours, theirs[..., :VOCAB], rtol=0, atol=1e-4)


def test_the_original_format_converts_to_the_same_model(published, llava_hf, tmp_path):
    original = written(convert_llava(published.original, published.clip, dtype="fp32"), tmp_path, "o")
    assert original.config == llava_hf.config
    assert original.state_dict().keys() == llava_hf.state_dict().keys()
    for key, tensor in llava_hf.state_dict().items():
        assert torch.equal(original.state_dict()[key], tensor), key
    assert original.fingerprint() == llava_hf.fingerprint()
    for question in QUESTIONS:
        assert original.prompt_ids(question) == llava_hf.prompt_ids(question)
    records = original.compress([photo(skimage.data.chelsea())])
    with torch.inference_mode():
        a = DecodeBatch(original, records, [original.prompt_ids(QUESTIONS[0])]).prompt_logits
        b = DecodeBatch(llava_hf, records, [llava_hf.prompt_ids(QUESTIONS[0])]).prompt_logits
    assert torch.equal(a, b)


def test_dtype_is_what_was_asked_and_defaults_to_the_llms(published):
    assert convert_llava(published.hf, dtype="bf16").model.voco.dtype == torch.bfloat16
    default = convert_llava(published.hf).model  # the tiny LLaVA is published in float32
    assert {t.dtype for t in default.state_dict().values()} == {torch.float32}


def test_with_mgvq_the_model_is_hybrid_with_mgvqs_published_weights(published, llava_hf, tmp_path):
    golden = load_file(str(GOLDEN))
    mgvq_state = {k.removeprefix("state."): v.float() for k, v in golden.items() if k.startswith("state.")}
    path = tmp_path / "mgvq_f16c32_g8.pt"
    torch.save({"model": mgvq_state}, path)
    converted = convert_llava(published.hf, mgvq=path, dtype="fp32", pd_hidden=96)
    assert set(converted.untrained) == {"P_d", "voco"} and "MGVQ" in converted.pretrained
    model = written(converted, tmp_path, "hybrid")
    cfg = model.config
    mgvq_config, expected = read_mgvq(path)
    assert (cfg.channels, cfg.mgvq, cfg.pd_hidden) == ("hybrid", mgvq_config, 96)
    assert cfg.image_size % cfg.vision.patch_size == 0 and cfg.image_size % cfg.mgvq.downsample == 0
    assert cfg.n_visual == cfg.n_discrete + cfg.n_patches
    for key, tensor in expected.items():
        assert torch.equal(model.mgvq.state_dict()[key], tensor), key
    for key, tensor in llava_hf.state_dict().items():  # LLaVA's parts as in the continuous conversion
        if key != "voco":
            assert torch.equal(model.state_dict()[key], tensor), key
    again = convert_llava(published.hf, mgvq=path, dtype="fp32", pd_hidden=96).model
    assert torch.equal(again.proj_d.w1.weight, model.proj_d.w1.weight)  # seeded: the same folder again
    # the central invariant in the LLaVA layout: decode from the record = the full masked pass
    data = photo(skimage.data.astronaut())
    prompt = model.prompt_ids(QUESTIONS[0])
    with torch.inference_mode():
        records = model.compress([data])
        pixels = pixels_from_bytes(data, IMAGE_SIZE, processing=cfg.preprocess)[None]
        full, _ = model(pixels, torch.tensor([prompt]))
        got = DecodeBatch(model, records, [prompt]).row_prompt_logits(0)
    assert (got - full[0]).abs().max().item() < 1e-4


# ---- VoCo-LLaMA ----


@pytest.fixture(scope="module")
def voco_llama(published, voco_llama_dir, tmp_path_factory):
    converted = convert_voco_llama(voco_llama_dir, published.clip, dtype="fp32")
    assert converted.ready and converted.untrained == {}
    return sharpened(written(converted, tmp_path_factory.mktemp("voco-out"), "out"))


def test_the_voco_llama_layout_is_its_own_tokenization(published, voco_llama, voco_llama_dir):
    model = voco_llama
    cfg = model.config
    assert (cfg.n_voco, cfg.visual_attention, cfg.channels) == (2, "causal", "continuous")
    assert cfg.llm.vocab_size == VOCAB and not cfg.layout.text_attends_prefix
    for question in QUESTIONS:
        assert our_ids(model, question) == voco_llama_ids(published.sp_model, question, cfg.n_patches)
        assert model.tokenizer.convert_ids_to_tokens(model.prompt_ids(question))[:2] == ["\n", "A"]
    assert model.layout.separator_ids == tuple(processor(published.sp_model, True).encode("\n"))
    voco_row = load_weights(voco_llama_dir)["model.embed_tokens.weight"][VOCAB]
    assert torch.equal(model.voco.data, voco_row.expand(2, -1))


def test_a_packed_voco_llama_conversation_is_its_own_tokenization(published, voco_llama):
    """VoCo-LLaMA's text after <voco> and after each "</s>" is encoded without a dummy prefix (its
    `legacy: false` tokenizer): a packed conversation's ids are those of the whole conversation so
    encoded, "… ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>", and the answers with their EOS are
    what is scored."""
    model = voco_llama
    ids, scored = packed_row(model, CONVERSATION)
    sp = processor(published.sp_model, dummy_prefix=False)
    (q1, a1), *later = CONVERSATION
    text = [f"{model.layout.prompt_text(q1)} {a1}", *(f"USER: {q.strip()} ASSISTANT: {a}" for q, a in later)]
    expected = voco_llama_ids(published.sp_model, q1, model.config.n_patches)
    expected = expected[: model.layout.text_position]
    for piece in text:
        expected += [*sp.encode(piece), sp.eos_id()]
    assert ids == expected
    tokens = model.tokenizer.convert_ids_to_tokens([i if i >= 0 else 0 for i in ids])
    answers = [(i, t) for i, (t, s) in enumerate(zip(tokens, scored, strict=True)) if s]
    pieces = [answer for _, answer in CONVERSATION]
    assert "".join(t for _, t in answers) == "".join(f"▁{a.replace(' ', '▁')}</s>" for a in pieces)


def test_a_legacy_tokenizer_keeps_the_dummy_prefix_after_voco(published, voco_llama_dir, tmp_path):
    """A checkpoint whose tokenizer_config says nothing of `legacy` (transformers' default then: true)."""
    folder = shutil.copytree(voco_llama_dir, tmp_path / "legacy")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["legacy"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    model = written(convert_voco_llama(folder, published.clip, dtype="fp32"), tmp_path, "out")
    for question in QUESTIONS:
        expected = voco_llama_ids(published.sp_model, question, model.config.n_patches, legacy=True)
        assert our_ids(model, question) == expected
        prompt = model.tokenizer.convert_ids_to_tokens(model.prompt_ids(question))
        assert prompt[:3] == ["▁", "\n", "A"]  # the dummy prefix before the text after voco


def voco_llama_pass(model, source_embed: torch.Tensor, pixels: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """VoCo-LLaMA's own forward over its input ids: token embeddings from its 401-row matrix (the voco
    rows included), the image features at the image positions, its mask rule: causal, except that every
    query after the last voco sees only keys from the first voco on. Logits (L, vocab)."""
    ids_t = torch.tensor(ids)
    embeds = source_embed[ids_t.clamp(min=0)]
    embeds[ids_t == IMAGE] = model.continuous_tokens(pixels[None])[0]
    vocos = (ids_t == VOCAB).nonzero().flatten()
    allowed = torch.ones(len(ids), len(ids), dtype=torch.bool).tril()
    allowed[vocos[-1] + 1 :, : vocos[0]] = False
    mask = to_additive(allowed)[None, None]
    return model.llm(inputs_embeds=embeds[None], attention_mask=mask).logits[0]


def test_voco_llama_decode_from_the_record_equals_its_full_pass(published, voco_llama, voco_llama_dir):
    model = voco_llama
    source_embed = load_weights(voco_llama_dir)["model.embed_tokens.weight"]
    images = [photo(skimage.data.chelsea()), photo(skimage.data.coffee())]
    records = model.compress(images)
    options = GenerationOptions(max_new_tokens=6)
    answers = decode(model, records, QUESTIONS[:2], options)
    for row, (image, question) in enumerate(zip(images, QUESTIONS, strict=False)):
        pixels = pixels_from_bytes(image, IMAGE_SIZE, processing=model.config.preprocess)
        ids = voco_llama_ids(published.sp_model, question, model.config.n_patches)
        prompt = model.prompt_ids(question)
        with torch.inference_mode():
            full = voco_llama_pass(model, source_embed, pixels, ids)[-len(prompt) :]
            got = DecodeBatch(model, records[row : row + 1], [prompt]).row_prompt_logits(0)
            err = (got - full).abs().max().item()
            assert err < 1e-4, f"row {row}: decode differs from VoCo-LLaMA's pass by {err}"
            greedy = []
            for _ in range(options.max_new_tokens):  # greedy on the full sequence, token by token
                token = int(voco_llama_pass(model, source_embed, pixels, ids + greedy)[-1].argmax())
                if token in model.stop_ids:
                    break
                greedy.append(token)
        assert answers[row].token_ids == greedy
        assert len(greedy) == options.max_new_tokens or answers[row].finish_reason == "eos"
    assert any(answer.token_ids for answer in answers)


def test_a_llava_folder_is_not_voco_llama_and_back(published, voco_llama_dir):
    with pytest.raises(CheckpointError, match=r"not a VoCo-LLaMA checkpoint.*convert llava"):
        convert_voco_llama(published.original, published.clip)
    with pytest.raises(CheckpointError, match="VoCo-LLaMA checkpoints are LLaVA's original format"):
        convert_voco_llama(published.hf, published.clip)
    with pytest.raises(CheckpointError, match=r"vocab_size is 401 but tokenizer\.model has 400 pieces"):
        convert_llava(voco_llama_dir, published.clip)
