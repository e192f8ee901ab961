"""Engine: template + image + splice + decode loop, checked against the parts run by hand."""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image

from vistune.config import GenerationConfig
from vistune.data.conversation import IMAGE_PLACEHOLDER, stop_strings, tokenize_prompt
from vistune.errors import VistuneError
from vistune.serve.engine import Engine, strip_stream, with_image
from vistune.serve.generate import Generator

CFG = GenerationConfig(max_new_tokens=12)


def photo(seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (40, 30, 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


@pytest.fixture(scope="module")
def engine(tiny_model):
    return Engine(copy.deepcopy(tiny_model), dtype=torch.float32)


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_answer_equals_the_parts_run_by_hand(engine):
    model, image = engine.model, photo(0)
    messages = ask("What is in the image?")
    ids = tokenize_prompt(with_image(messages, image), model.tokenizer, model.config.template)
    with torch.no_grad():
        embeds = model.project(model.image_features(model.image_processor([image])))
    spliced = model.splice([ids], embeds, padding_side="left")
    assert spliced.inputs_embeds.shape[1] == len(ids) - 1 + model.num_image_tokens
    raw = Generator(model.llm, model.tokenizer).generate(
        spliced.inputs_embeds, spliced.attention_mask, CFG, engine.stop
    )[0]
    assert engine.stop == stop_strings(model.config.template, model.tokenizer)
    assert engine.answer(messages, image, CFG) == raw.strip()


def test_prepare_left_pads_and_places_image_rows(engine):
    model = engine.model
    requests = [(ask("Describe the image."), photo(1)), (ask("Hi"), None)]
    inputs = engine.prepare(requests)
    n_img = len(tokenize_prompt(with_image(*requests[0]), model.tokenizer, engine.template))
    n_txt = len(tokenize_prompt(requests[1][0], model.tokenizer, engine.template))
    width = n_img - 1 + model.num_image_tokens
    assert inputs.inputs_embeds.shape[:2] == (2, width)
    assert inputs.attention_mask.sum(1).tolist() == [width, n_txt]
    assert inputs.attention_mask[1, : width - n_txt].sum() == 0  # left padding
    with torch.no_grad():
        rows = model.project(model.image_features(model.image_processor([photo(1)])))[0]
    found = [
        i
        for i in range(width - rows.shape[0] + 1)
        if torch.equal(inputs.inputs_embeds[0, i : i + rows.shape[0]], rows)
    ]
    assert len(found) == 1


def test_stream_joins_to_answer(engine):
    for image in (photo(3), None):
        messages = ask("What colour is it?")
        assert "".join(engine.stream(messages, image, CFG)) == engine.answer(messages, image, CFG)


def test_batch_with_and_without_images_equals_one_by_one(engine):
    requests = [
        (ask("What is in the image?"), photo(4)),
        (ask("Say a number."), None),
        (
            [
                {"role": "user", "content": "How many objects?"},
                {"role": "assistant", "content": "There are three."},
                {"role": "user", "content": "Which is left?"},
            ],
            photo(5),
        ),
    ]
    singles = [engine.answer(m, img, CFG) for m, img in requests]
    assert engine.answer_batch(requests, CFG) == singles
    small = Engine(engine.model, dtype=torch.float32, batch_size=2)
    assert small.answer_batch(requests, CFG) == singles


def test_template_override_changes_prompt_and_stops(engine):
    assert engine.template == "vicuna_v0" and engine.stop == ("###",)
    chat = Engine(engine.model, dtype=torch.float32, template="chat_template")
    assert chat.stop == ("<|im_end|>",)
    messages = ask("Hi")
    ids = chat.prepare([(messages, None)]).inputs_embeds.shape[1]
    assert ids == len(tokenize_prompt(messages, engine.tokenizer, "chat_template"))
    assert ids != engine.prepare([(messages, None)]).inputs_embeds.shape[1]


def test_bf16_engine_casts_and_answers(tiny_model):
    eng = Engine(copy.deepcopy(tiny_model), dtype=torch.bfloat16)
    assert eng.model.llm.get_input_embeddings().weight.dtype == torch.bfloat16
    messages = ask("What is in the image?")
    answer = eng.answer(messages, photo(6), CFG)
    assert isinstance(answer, str)
    assert "".join(eng.stream(messages, photo(6), CFG)) == answer


def test_with_image_places_one_placeholder():
    msgs = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    placed = with_image(msgs + [{"role": "user", "content": "Q2"}], photo(0))
    assert placed[0]["content"] == f"{IMAGE_PLACEHOLDER}\nQ" and placed[2]["content"] == "Q2"
    assert msgs[0]["content"] == "Q"  # the caller's messages are not changed
    kept = with_image([{"role": "user", "content": f"Q {IMAGE_PLACEHOLDER}"}], photo(0))
    assert kept[0]["content"] == f"Q {IMAGE_PLACEHOLDER}"
    with pytest.raises(VistuneError, match="no image"):
        with_image([{"role": "user", "content": IMAGE_PLACEHOLDER}], None)
    with pytest.raises(VistuneError, match="2 times"):
        with_image([{"role": "user", "content": IMAGE_PLACEHOLDER * 2}], photo(0))


def test_strip_stream():
    pieces = ["  ", "\n Hello", " ", "world", " \n", ""]
    out = list(strip_stream(iter(pieces)))
    assert "".join(out) == "".join(pieces).strip() == "Hello world"
    assert all(out)
    assert list(strip_stream(iter([" ", "\n"]))) == []


def test_stream_checks_messages_when_called(engine):
    from vistune.errors import DataError

    with pytest.raises(DataError):
        engine.stream([{"role": "assistant", "content": "hi"}], None, CFG)  # not iterated


def test_prompt_longer_than_the_context_is_a_clear_error(engine):
    """The tiny LLM takes 512 positions: a longer prompt is the user's to shorten, said
    before anything is generated (stream included)."""
    messages = ask("the cat sat on the mat " * 120)
    with pytest.raises(VistuneError, match=r"prompt is \d+ tokens.*context of 512"):
        engine.answer(messages, photo(7), CFG)
    with pytest.raises(VistuneError, match="context of 512"):
        engine.stream(messages, None, CFG)  # not iterated
    with pytest.raises(VistuneError, match="context of 512"):
        engine.answer_batch([(ask("Hi"), None), (messages, None)], CFG)


def test_bf16_engine_keeps_rope_frequencies_float32(tiny_model, tiny_llm_dir):
    """Casting to bf16 leaves RoPE's inv_freq in float32, as transformers' own bf16 loading
    does: the engine's LLM gives exactly the logits of `from_pretrained(dtype=bf16)`."""
    from transformers import LlamaForCausalLM

    eng = Engine(copy.deepcopy(tiny_model), dtype=torch.bfloat16)
    ref = LlamaForCausalLM.from_pretrained(tiny_llm_dir, dtype=torch.bfloat16).eval()
    assert eng.model.llm.model.rotary_emb.inv_freq.dtype == torch.float32
    ids = torch.randint(5, 500, (1, 480), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = eng.model.llm(input_ids=ids).logits, ref(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
