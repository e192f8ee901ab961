"""Teachers: rules (exact, deterministic, parseable), openai (loopback server), local (tiny LM)."""

from __future__ import annotations

import random

import pytest

from vistune.chat_client import ClientConfig
from vistune.data.annotations import Box, ImageContext
from vistune.datagen.messages import build_messages
from vistune.datagen.parse import RejectedOutput, parse_description, parse_pairs, parse_response
from vistune.datagen.teachers import (
    TEACHERS,
    LocalTeacher,
    OpenAITeacher,
    Request,
    RulesTeacher,
    make_teacher,
)

CONTEXT = ImageContext(
    image_id="7",
    image="train/7.png",
    captions=("A red plate between two cups on a table.", "Two cups flank a plate."),
    boxes=(
        Box("cup", (0.05, 0.45, 0.20, 0.60)),
        Box("plate", (0.40, 0.40, 0.60, 0.60)),
        Box("cup", (0.80, 0.45, 0.95, 0.60)),
    ),
)


def request(response_type: str, context: ImageContext = CONTEXT) -> Request:
    question = "Describe the picture in detail." if response_type == "detail" else None
    return Request(
        response_type, context, build_messages(response_type, context, question), question
    )


def test_registry_and_unknown_names():
    assert set(TEACHERS) == {"openai", "local", "rules"}
    assert isinstance(make_teacher("rules"), RulesTeacher)
    with pytest.raises(ValueError, match="openai, local, rules"):
        make_teacher("gpt5")


def test_rules_teacher_says_it_is_not_an_llm():
    assert make_teacher("rules").name == "rules (not an LLM)"


def test_rules_detail_and_complex_parse_and_count():
    detail = RulesTeacher().respond(request("detail"))
    assert "three objects in view: two cups and a red plate" in parse_description(detail)
    assert "A small cup is in the middle left of the picture." in detail
    ((question, answer),) = parse_pairs(RulesTeacher().respond(request("complex")))
    assert question == "If all the cups were taken away, how many objects would be left?"
    assert "3 - 2 = 1" in answer and answer.endswith("So one object would be left.")


def test_rules_is_deterministic():
    teacher = RulesTeacher()
    for rtype in ("conversation", "detail", "complex"):
        assert teacher.respond(request(rtype)) == teacher.respond(request(rtype))


def test_rules_output_always_parses_on_random_scenes():
    rng = random.Random(0)
    kinds = ["person", "bus", "dog", "traffic light", "sheep", "cup"]
    for i in range(60):
        boxes = []
        for _ in range(rng.randint(0, 6)):
            x1, y1 = rng.uniform(0, 0.8), rng.uniform(0, 0.8)
            boxes.append(Box(rng.choice(kinds), (x1, y1, x1 + rng.uniform(0.05, 0.2), y1 + 0.1)))
        ctx = ImageContext(str(i), f"{i}.png", ("A scene with things.",), tuple(boxes))
        for rtype in ("conversation", "detail", "complex"):
            req = request(rtype, ctx)
            assert parse_response(rtype, RulesTeacher().respond(req), req.question)


def test_openai_teacher_sends_the_messages(chat_server):
    teacher = OpenAITeacher(ClientConfig(chat_server.url, "gpt-x", backoff=0.001), api_key="k")
    req = request("complex")
    assert teacher.respond(req).startswith("Question: What can be seen")
    assert teacher.name == "openai:gpt-x"
    assert chat_server.bodies[0]["messages"] == req.messages
    teacher.close()


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory):
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<unk>", "<pad>", "</s>", "<|system|>", "<|user|>", "<|assistant|>",
             "Question:", "Answer:", "the", "a", "red", "cup", "plate", "is", "on", "left"]  # fmt: skip
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="</s>")  # fmt: skip
    fast.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    path = tmp_path_factory.mktemp("tiny-lm")
    fast.save_pretrained(path)
    config = LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=4096, eos_token_id=2, pad_token_id=1)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def test_local_teachers_in_folders_of_the_same_name_are_different_teachers(tmp_path, tiny_lm_dir):
    """The name is the store's cache key: `runs/a/checkpoint-9` must not reuse the answers
    of `runs/b/checkpoint-9`."""
    import shutil

    for parent in ("a", "b"):
        shutil.copytree(tiny_lm_dir, tmp_path / parent / "checkpoint-9")
    a, b = (
        LocalTeacher(tmp_path / "a" / "checkpoint-9"),
        LocalTeacher(tmp_path / "b" / "checkpoint-9"),
    )
    assert a.name != b.name
    assert a.name == f"local:{(tmp_path / 'a' / 'checkpoint-9').resolve()}"
    assert LocalTeacher().name == "local:default SmolLM2-135M-Instruct"


def test_local_teacher_is_greedy_through_the_chat_template(tiny_lm_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = LocalTeacher(tiny_lm_dir, max_new_tokens=8)
    assert teacher.name == f"local:{tiny_lm_dir.resolve()}" and not teacher.concurrent
    assert teacher.lm.model is None  # loads on first use
    req = request("conversation")
    with pytest.raises(RejectedOutput) as first:  # a random tiny LM never stops by itself
        teacher.respond(req)
    with pytest.raises(RejectedOutput) as second:
        teacher.respond(req)
    assert first.value.reason == "truncated" and first.value.raw == second.value.raw
    text = first.value.raw

    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    prompt = tok.apply_chat_template(req.messages, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|system|> You write training conversations")
    assert prompt.endswith("<|assistant|>")
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, do_sample=False, max_new_tokens=8, pad_token_id=1)
    assert out.shape[1] == ids["input_ids"].shape[1] + 8 and out[0, -1].item() != 2
    expected = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    assert text == expected


def test_a_local_teacher_stops_at_its_context(tiny_lm_dir):
    """A prompt longer than the teacher's positions is that request's rejection, not an
    error that stops the run; a reply stops where the context ends."""
    teacher = LocalTeacher(tiny_lm_dir, max_new_tokens=8)
    req = request("conversation")
    teacher.lm.load()
    tok = teacher.lm.tokenizer
    text = tok.apply_chat_template(req.messages, tokenize=False, add_generation_prompt=True)
    prompt = len(tok(text, add_special_tokens=False)["input_ids"])
    teacher.lm.model.config.max_position_embeddings = prompt
    with pytest.raises(RejectedOutput) as long:
        teacher.respond(req)
    assert long.value.reason == "too_long"
    assert f"{prompt} tokens, the teacher reads {prompt}" in str(long.value)
    teacher.lm.model.config.max_position_embeddings = prompt + 3
    with pytest.raises(RejectedOutput) as cut:  # a random tiny LM never stops by itself
        teacher.respond(req)
    assert cut.value.reason == "truncated" and "3 new tokens" in str(cut.value)
    assert len(tok(cut.value.raw, add_special_tokens=False)["input_ids"]) <= 3


def test_a_local_teacher_folder_is_checked_at_once_and_never_unpickled(tiny_lm_dir, tmp_path):
    """As the local judge: a missing folder, pickle-only weights, custom code or a tokenizer
    without a chat template is one ModelDirError when the teacher is made, before any
    request; nothing from a .bin file is ever unpickled."""
    import json
    import shutil

    import torch
    from safetensors.torch import load_file

    from vistune.errors import ModelDirError

    with pytest.raises(ModelDirError, match="teacher directory not found"):
        LocalTeacher(tmp_path / "nope")
    pickled = shutil.copytree(tiny_lm_dir, tmp_path / "pickled")
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    with pytest.raises(ModelDirError, match=r"pickle \.bin files are never loaded"):
        LocalTeacher(pickled)
    custom = shutil.copytree(tiny_lm_dir, tmp_path / "custom")
    config = json.loads((custom / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling.Evil"}
    (custom / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelDirError, match="declares custom code"):
        LocalTeacher(custom)
    bare = shutil.copytree(tiny_lm_dir, tmp_path / "bare")
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelDirError, match="has no chat template"):
        LocalTeacher(bare)


def test_a_local_teacher_with_broken_weights_is_one_error_naming_the_folder(tiny_lm_dir, tmp_path):
    import shutil

    from vistune.errors import ModelDirError

    broken = shutil.copytree(tiny_lm_dir, tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    teacher = LocalTeacher(broken, max_new_tokens=4)  # the weights load on first use
    with pytest.raises(ModelDirError, match=rf"{broken}: cannot load the teacher"):
        teacher.respond(request("conversation"))
