"""Templates with Llama-style SentencePiece tokenizers, which mark a word start at the
beginning of every encode call: the answers must still be supervised exactly."""

from __future__ import annotations

from vistune.data.conversation import (
    IGNORE_INDEX,
    IMAGE_TOKEN_ID,
    tokenize_conversation,
    tokenize_prompt,
)
from vistune.data.dataset import build_samples

CONV = [
    {"from": "human", "value": "<image>\nWhat is in the photo?"},
    {"from": "gpt", "value": "A red square and a blue circle."},
    {"from": "human", "value": "Describe the image briefly."},
    {"from": "gpt", "value": "A cat sits on a mat."},
]


def _spans(out):
    """The supervised runs of a Tokenized, as lists of ids."""
    runs, run = [], []
    for lab in out.labels:
        if lab == IGNORE_INDEX:
            if run:
                runs.append(run)
            run = []
        else:
            run.append(lab)
    return [*runs, run] if run else runs


def test_vicuna_v0_answers_have_no_stray_word_marker(sentencepiece_tokenizer):
    """Before the fix a legacy tokenizer encoded " A red square...###" as "▁" "▁A" ...:
    every vicuna_v0 sample was a template_mismatch."""
    tok = sentencepiece_tokenizer
    out = tokenize_conversation(CONV, tok, "vicuna_v0", "s1")
    spans = _spans(out)
    assert len(spans) == 2
    kw = {"skip_special_tokens": False, "clean_up_tokenization_spaces": False}
    answers = ["A red square and a blue circle.", "A cat sits on a mat."]
    for span, answer in zip(spans, answers, strict=True):
        tokens = tok.convert_ids_to_tokens(span)
        assert tokens[0] != "▁" and tokens[0].startswith("▁A"), tokens
        assert tok.decode(span, **kw).strip() == answer + "###"
    # inside the sequence, "###" before "Human:" carries no word marker either
    seq = tok.convert_ids_to_tokens([i for i in out.input_ids if i != IMAGE_TOKEN_ID])
    assert not [t for t in seq if t.startswith(("▁###", "▁Human"))], seq
    assert out.input_ids[0] == tok.bos_token_id


def test_the_inference_prompt_is_a_training_prefix(sentencepiece_tokenizer):
    tok = sentencepiece_tokenizer
    out = tokenize_conversation(CONV, tok, "vicuna_v0", "s1")
    messages = [{"role": "user", "content": CONV[0]["value"]}]
    prompt = tokenize_prompt(messages, tok, "vicuna_v0")
    assert out.input_ids[: len(prompt)] == prompt
    assert out.labels[len(prompt)] != IGNORE_INDEX  # the answer starts right after it


def test_no_sample_is_a_template_mismatch(sentencepiece_tokenizer, tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    rows = [{"id": str(i), "image": "a.png", "conversations": CONV} for i in range(6)]
    for template in ("vicuna_v0", "plain"):
        data = rows if template == "vicuna_v0" else [{**r, "conversations": CONV[:2]} for r in rows]
        samples, skipped = build_samples(
            data, sentencepiece_tokenizer, template, tmp_path, image_tokens=4, max_length=512
        )
        assert (len(samples), dict(skipped)) == (6, {}), template


def test_plain_caption_keeps_the_marker_after_the_image(sentencepiece_tokenizer):
    """Right after the image the caption is encoded on its own, as LLaVA's
    tokenizer_image_token does: its first word keeps the "▁" it has at a text start."""
    tok = sentencepiece_tokenizer
    out = tokenize_conversation(CONV[:2], tok, "plain", "s1")
    after = out.input_ids.index(IMAGE_TOKEN_ID) + 1
    assert tok.convert_ids_to_tokens(out.input_ids[after]).startswith("▁A")
