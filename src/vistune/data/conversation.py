"""Conversation templates: LLaVA JSON conversations -> token ids and loss masks (paper §4.2).

A sample's turns `[{"from": "human"|"gpt", "value": str}, ...]` become one token sequence in
which only the assistant answers and their stop are supervised (paper Table 2, eq. 3). The
image is the placeholder "<image>" in the first human turn; in `input_ids` it is the single
id IMAGE_TOKEN_ID (-200), which the model replaces by the projected image tokens.

Templates (names are exact; `get_template` lists them on a typo):

- `vicuna_v0`: the paper's Table 2, as LLaVA's `conv_vicuna_v0` with `SeparatorStyle.SINGLE`
  (llava/conversation.py). With SYSTEM the Vicuna-v0 system message and SEP = "###"::

      SYSTEM + "###" + "Human: " + q1 + "###" + "Assistant: " + a1 + "###"
                     + "Human: " + q2 + "###" + "Assistant: " + a2 + "###" ...

  the prompt for generation ends with "###Assistant:", and each supervised span is
  " " + answer + "###" (the space after "Assistant:" belongs to the answer). Stop: "###".
- `plain`: LLaVA's `conv_llava_plain` for stage 1 (feature alignment): the human text is
  dropped, the prompt is just "<image>" and the answer is caption + "\\n"; only caption + "\\n"
  is supervised. Stop: "\\n".
- `chat_template`: the LLM tokenizer's own chat template (`apply_chat_template`). Assistant
  spans are found by rendering the conversation up to each assistant message with the
  generation prompt and up to its end without it; the supervised span is the answer plus the
  first control token the template emits after it (e.g. "<|im_end|>" for SmolLM2). Anything
  the template adds around that (a trailing "\\n", a default system message) is context.

How text becomes tokens (the BPE-boundary choice): every template produces a list of text
segments that alternate context / supervised, cut exactly where generation starts and stops
(after "Assistant:", after "<|im_start|>assistant\\n", after "<image>"). Each segment is
tokenised on its own (without special tokens), split on "<image>" with IMAGE_TOKEN_ID put in
between, so no token straddles a prompt/answer boundary. Tokenizers that mark a word start at
the beginning of every encode call (SentencePiece's dummy prefix: legacy Llama / Vicuna) get
each piece that follows text encoded as it would be after that text (`_encode_text`). `tokenize_prompt` uses the same
segments, so the ids the model sees at inference are exactly a training prefix, and the
answer is tokenised as the model would emit it after the prompt. For `vicuna_v0` and `plain`
the tokenizer's own leading special tokens (a BOS, if it adds one) go first; the chat template
writes its own. After building, every supervised span is decoded and compared with its
expected text; any difference raises TemplateMismatchError naming the sample.
"""

from __future__ import annotations

import random
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vistune.errors import DataError, ModelDirError, TemplateMismatchError

IMAGE_PLACEHOLDER = "<image>"
IMAGE_TOKEN_ID = -200
IGNORE_INDEX = -100

ROLES = {"human": "user", "gpt": "assistant"}
"""LLaVA JSON speaker -> chat role."""

VICUNA_V0_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
VICUNA_V0_SEP = "###"


@dataclass(frozen=True)
class Segment:
    """A piece of the rendered conversation, tokenised on its own."""

    text: str
    supervised: bool


@dataclass
class Tokenized:
    """Token ids of one sample and their labels (IGNORE_INDEX where not supervised)."""

    input_ids: list[int]
    labels: list[int]
    turns: list[int] | None = None
    """With turns apart (`tokenize_turns_apart`): the turn each token belongs to, 0 for the
    prefix every turn shares; None for one causal sequence."""


SegmentFn = Callable[[list[dict[str, str]], Any, bool], list[Segment]]
"""(messages, tokenizer, open_end) -> segments; open_end appends the generation prompt."""


@dataclass(frozen=True)
class Template:
    """A named way to lay out a conversation as context and supervised text segments."""

    name: str
    segments: SegmentFn
    stops: Callable[[Any], tuple[str, ...]]
    special_prefix: bool
    """Prepend the tokenizer's own leading special tokens (BOS) before the first segment."""


def _merge(segments: list[Segment]) -> list[Segment]:
    """Drop empty segments and join neighbouring context segments (answers stay separate)."""
    out: list[Segment] = []
    for seg in segments:
        if not seg.text:
            continue
        if out and not out[-1].supervised and not seg.supervised:
            out[-1] = Segment(out[-1].text + seg.text, False)
        else:
            out.append(seg)
    return out


def _vicuna_v0_segments(
    messages: list[dict[str, str]], tokenizer: Any, open_end: bool
) -> list[Segment]:
    sep = VICUNA_V0_SEP
    segs = [Segment(VICUNA_V0_SYSTEM + sep, False)]
    for msg in messages:
        if msg["role"] == "user":
            segs.append(Segment("Human: " + msg["content"] + sep, False))
        else:
            segs.append(Segment("Assistant:", False))
            segs.append(Segment(" " + msg["content"] + sep, True))
    if open_end:
        segs.append(Segment("Assistant:", False))
    return _merge(segs)


def _plain_segments(
    messages: list[dict[str, str]], tokenizer: Any, open_end: bool
) -> list[Segment]:
    segs = []
    for msg in messages:
        if msg["role"] == "user":
            has_image = IMAGE_PLACEHOLDER in msg["content"]
            segs.append(Segment(IMAGE_PLACEHOLDER if has_image else "", False))
        else:
            segs.append(Segment(msg["content"] + "\n", True))
    return _merge(segs)


def _control_tokens(tokenizer: Any) -> list[str]:
    """Special and added tokens (the strings a chat template uses as markers)."""
    names = set(tokenizer.all_special_tokens)
    names.update(t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values())
    names.discard(IMAGE_PLACEHOLDER)
    return sorted((n for n in names if n), key=len, reverse=True)


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ModelDirError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat_template; "
            "use the vicuna_v0 or plain template"
        )
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )


_PROBE = "VISTUNEANSWERPROBE"
"""Stand-in answer rendered once per assistant turn to find where the template puts the answer
(searching for the answer itself could hit an earlier "A" in a header for short answers)."""


def _answer_span(
    messages: list[dict[str, str]], i: int, prefix: str, part: str, tokenizer: Any
) -> tuple[int, int]:
    """(start, end) of answer i + its end-of-turn token inside `part`, the text the template
    renders for assistant message i after `prefix` (the conversation before it + generation
    prompt)."""
    probe = messages[:i] + [{"role": "assistant", "content": _PROBE}]
    probe_text = _render(tokenizer, probe, False)
    start = probe_text.find(_PROBE, len(prefix)) - len(prefix)
    content = messages[i]["content"]
    for text in (content, content.strip()):
        if start >= 0 and part.startswith(text, start):
            break
    else:
        raise TemplateMismatchError(f"chat template does not render the answer {content!r}")
    tail_at = start + len(text)
    tail = part[tail_at:]
    hits = [(tail.find(tok), -len(tok), tok) for tok in _control_tokens(tokenizer)]
    hits = [h for h in hits if h[0] >= 0]
    if not hits:
        raise TemplateMismatchError(
            "chat template emits no end-of-turn token after the assistant message"
        )
    pos, _, tok = min(hits)
    return start, tail_at + pos + len(tok)


def _chat_template_segments(
    messages: list[dict[str, str]], tokenizer: Any, open_end: bool
) -> list[Segment]:
    full = _render(tokenizer, messages, open_end)
    segs, pos = [], 0
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:i], True)
        upto = _render(tokenizer, messages[: i + 1], False)
        if not (full.startswith(upto) and upto.startswith(prefix) and len(prefix) >= pos):
            raise TemplateMismatchError(
                "chat template does not render a conversation as a prefix-stable sequence "
                f"(assistant message {i})"
            )
        start, end = _answer_span(messages, i, prefix, upto[len(prefix) :], tokenizer)
        segs.append(Segment(full[pos : len(prefix) + start], False))
        segs.append(Segment(full[len(prefix) + start : len(prefix) + end], True))
        pos = len(prefix) + end
    segs.append(Segment(full[pos:], False))
    return _merge(segs)


def _chat_template_stops(tokenizer: Any) -> tuple[str, ...]:
    demo = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    segs = _chat_template_segments(demo, tokenizer, False)
    answer = next(s.text for s in segs if s.supervised)
    stop = next(t for t in _control_tokens(tokenizer) if answer.endswith(t))
    return (stop,)


TEMPLATES: dict[str, Template] = {
    "vicuna_v0": Template("vicuna_v0", _vicuna_v0_segments, lambda tok: (VICUNA_V0_SEP,), True),
    "plain": Template("plain", _plain_segments, lambda tok: ("\n",), True),
    "chat_template": Template(
        "chat_template", _chat_template_segments, _chat_template_stops, False
    ),
}


def get_template(name: str) -> Template:
    """The template called `name`; ValueError listing the valid names otherwise."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; valid: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def stop_strings(template: str, tokenizer: Any) -> tuple[str, ...]:
    """Strings that end an assistant answer under `template` (e.g. ("###",) for vicuna_v0)."""
    return get_template(template).stops(tokenizer)


def _special_prefix(tokenizer: Any) -> list[int]:
    """The ids the tokenizer puts before any text (a BOS), found by comparing encodings."""
    bare = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    for i in range(len(full) - len(bare) + 1):
        if full[i : i + len(bare)] == bare:
            return list(full[:i])
    return []


_ANCHOR = "\n"
_PREFIXES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _encode_after_text(text: str, tokenizer: Any) -> list[int] | None:
    """Ids of `text` as they come after other text: encoded behind an anchor ("\\n") that is
    then cut off. None where the anchor's ids do not stay apart (it merged with `text`)."""
    head = tokenizer.encode(_ANCHOR, add_special_tokens=False)
    ids = tokenizer.encode(_ANCHOR + text, add_special_tokens=False)
    return ids[len(head) :] if ids[: len(head)] == head else None


def _prefixes(tokenizer: Any) -> bool:
    """Whether encoding text on its own marks a word start that the same text would not get
    after other text: SentencePiece's dummy prefix, as in legacy Llama/Vicuna tokenizers (a
    `Prepend("▁")` normalizer: " answer" alone is "▁" "▁answer") and in Metaspace's
    `prepend_scheme="first"` ("###" alone is "▁###"). BPE tokenizers (GPT-2, SmolLM2,
    Llama 3) encode the same either way."""
    try:
        return _PREFIXES[tokenizer]
    except (KeyError, TypeError):
        pass
    found = False
    for probe in ("a", " a"):
        after = _encode_after_text(probe, tokenizer)
        found |= after is not None and after != tokenizer.encode(probe, add_special_tokens=False)
    try:
        _PREFIXES[tokenizer] = found
    except TypeError:  # not weakly referenceable: asked again next time
        pass
    return found


def _encode_text(text: str, tokenizer: Any, after_text: bool) -> tuple[list[int], bool]:
    """Ids of one segment ("<image>" -> IMAGE_TOKEN_ID), and whether it ends in text.

    A piece that follows text of the same sequence (`after_text`, or an earlier piece) is
    encoded as it would be inside one string, where the tokenizer adds a word-start marker
    to every encode call (`_prefixes`); without that, a legacy Llama tokenizer would put
    an extra "▁" before every answer and its spans could not match. The sequence's first
    piece and a piece right after the image keep the marker, as LLaVA's
    tokenizer_image_token gives them (it encodes the text around "<image>" call by call)."""
    ids: list[int] = []
    anchored = _prefixes(tokenizer)
    for k, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if k:
            ids.append(IMAGE_TOKEN_ID)
            after_text = False
        if piece:
            got = _encode_after_text(piece, tokenizer) if after_text and anchored else None
            ids.extend(
                got if got is not None else tokenizer.encode(piece, add_special_tokens=False)
            )
            after_text = True
    return ids, after_text


def _decode_span(tokenizer: Any, ids: list[int], start: int, end: int) -> str:
    """Text of ids[start:end], decoded after a few context tokens so that decoders which strip
    a leading space on the first token (SentencePiece) do not alter the span."""
    anchor = start
    while anchor > 0 and start - anchor < 3 and ids[anchor - 1] >= 0:
        anchor -= 1
    kw = {"skip_special_tokens": False, "clean_up_tokenization_spaces": False}
    whole = tokenizer.decode(ids[anchor:end], **kw)
    head = tokenizer.decode(ids[anchor:start], **kw) if anchor < start else ""
    if whole.startswith(head):
        return whole[len(head) :]
    return tokenizer.decode(ids[start:end], **kw)


def _encode_segments(
    segments: list[Segment], tokenizer: Any, template: Template, sample_id: str
) -> Tokenized:
    ids = _special_prefix(tokenizer) if template.special_prefix else []
    labels = [IGNORE_INDEX] * len(ids)
    spans = []
    after_text = False  # a BOS is not text: the first piece keeps its word-start marker
    for seg in segments:
        piece, after_text = _encode_text(seg.text, tokenizer, after_text)
        if seg.supervised:
            spans.append((len(ids), len(ids) + len(piece), seg.text))
            labels.extend(piece)
        else:
            labels.extend([IGNORE_INDEX] * len(piece))
        ids.extend(piece)
    for start, end, expected in spans:
        got = _decode_span(tokenizer, ids, start, end)
        if got != expected or IMAGE_TOKEN_ID in ids[start:end]:
            raise TemplateMismatchError(
                f"sample {sample_id}: supervised tokens decode to {got!r}, expected "
                f"{expected!r} (template {template.name})"
            )
    return Tokenized(input_ids=ids, labels=labels)


def _place_image(text: str, rng: random.Random) -> str:
    """Paper eq. 2: the first instruction is [X_q, X_v] or [X_v, X_q] at random."""
    question = text.replace(IMAGE_PLACEHOLDER, "").strip()
    if not question:
        return IMAGE_PLACEHOLDER
    if rng.random() < 0.5:
        return IMAGE_PLACEHOLDER + "\n" + question
    return question + "\n" + IMAGE_PLACEHOLDER


def _check_image_turns(messages: list[dict[str, str]], where: str) -> None:
    count = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
    first = messages[0]["content"].count(IMAGE_PLACEHOLDER) if messages else 0
    if count > 1 or count != first:
        raise DataError(f"{where}: {IMAGE_PLACEHOLDER} may appear once, in the first human turn")


def to_messages(
    conversations: list[dict], sample_id: str = "?", rng: random.Random | None = None
) -> list[dict[str, str]]:
    """LLaVA JSON turns -> chat messages, checked (alternating, human first, gpt last).

    With `rng`, the image in the first turn is put before or after the question at random
    (paper eq. 2); without it the data's own placement is kept.
    """
    where = f"sample {sample_id}"
    if not isinstance(conversations, list) or not conversations:
        raise DataError(f"{where}: conversations must be a non-empty list")
    messages = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise DataError(f"{where}: turn {i} needs a 'from' and a string 'value'")
        speaker = turn.get("from")
        if not isinstance(speaker, str) or speaker not in ROLES:
            raise DataError(
                f"{where}: turn {i} has unknown 'from' {speaker!r}; valid: {', '.join(ROLES)}"
            )
        expected = "human" if i % 2 == 0 else "gpt"
        if speaker != expected:
            raise DataError(f"{where}: turn {i} is from {speaker!r}, expected {expected!r}")
        messages.append({"role": ROLES[speaker], "content": turn["value"]})
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last turn is a human turn with no answer")
    _check_image_turns(messages, where)
    if rng is not None and IMAGE_PLACEHOLDER in messages[0]["content"]:
        messages[0] = {"role": "user", "content": _place_image(messages[0]["content"], rng)}
    return messages


def tokenize_conversation(
    conversations: list[dict],
    tokenizer: Any,
    template: str,
    sample_id: str = "?",
    rng: random.Random | None = None,
) -> Tokenized:
    """Token ids and labels for one LLaVA JSON sample; only answers + stops are supervised."""
    tpl = get_template(template)
    messages = to_messages(conversations, sample_id, rng)
    try:
        segments = tpl.segments(messages, tokenizer, False)
    except TemplateMismatchError as err:
        raise TemplateMismatchError(f"sample {sample_id}: {err}") from None
    return _encode_segments(segments, tokenizer, tpl, sample_id)


def tokenize_turns_apart(
    conversations: list[dict],
    tokenizer: Any,
    template: str,
    sample_id: str = "?",
    rng: random.Random | None = None,
) -> Tokenized:
    """A multi-turn sample with its turns trained apart: each question and answer is rendered
    as its own one-turn conversation with the image first ("<image>\\n" + question, as
    evaluation and LLaVA's model_vqa ask), and the renderings share their tokens up to and
    including the image. That prefix is kept once, then each turn's own tokens follow;
    `turns` marks them 1, 2, ... so attention (vistune.model.splice.turn_mask) lets each
    turn see the prefix and itself only, its positions continuing from the prefix's end.
    Training on it equals training on the one-turn samples one by one (a turn cannot read
    an earlier turn's answer: "How many stars?" after "I can see two red stars" must be
    answered from the picture), at the cost of one pass over the image and the prompt.

    One-turn samples and samples without an image are tokenised as `tokenize_conversation`
    does (with `rng`'s image placement)."""
    messages = to_messages(conversations, sample_id)
    if len(messages) <= 2 or IMAGE_PLACEHOLDER not in messages[0]["content"]:
        return tokenize_conversation(conversations, tokenizer, template, sample_id, rng)
    tpl = get_template(template)
    prefix: list[int] | None = None
    ids: list[int] = []
    labels: list[int] = []
    turns: list[int] = []
    for k in range(0, len(messages), 2):
        question = messages[k]["content"].replace(IMAGE_PLACEHOLDER, "").strip()
        pair = [
            {"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{question}"},
            messages[k + 1],
        ]
        try:
            segments = tpl.segments(pair, tokenizer, False)
        except TemplateMismatchError as err:
            raise TemplateMismatchError(f"sample {sample_id}: {err}") from None
        one = _encode_segments(segments, tokenizer, tpl, sample_id)
        cut = one.input_ids.index(IMAGE_TOKEN_ID) + 1
        if prefix is None:
            prefix = one.input_ids[:cut]
            ids, labels, turns = list(prefix), one.labels[:cut], [0] * cut
        elif one.input_ids[:cut] != prefix:
            raise TemplateMismatchError(
                f"sample {sample_id}: turn {k // 2 + 1} renders a different prefix before the "
                f"image than turn 1 ({template} template); its turns cannot be trained apart"
            )
        own = one.input_ids[cut:]
        if not own or one.labels[cut] != IGNORE_INDEX:
            raise TemplateMismatchError(
                f"sample {sample_id}: turn {k // 2 + 1} has no question between the image and "
                "its answer; its turns cannot be trained apart"
            )
        ids += own
        labels += one.labels[cut:]
        turns += [k // 2 + 1] * len(own)
    return Tokenized(input_ids=ids, labels=labels, turns=turns)


def _prompt_segments(messages: list[dict], tokenizer: Any, template: str) -> list[Segment]:
    tpl = get_template(template)
    if not messages:
        raise DataError("prompt: no messages")
    for i, msg in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if not isinstance(msg, dict) or msg.get("role") != expected:
            raise DataError(f"prompt: message {i} must have role {expected!r}")
        if not isinstance(msg.get("content"), str):
            raise DataError(f"prompt: message {i} needs a string 'content'")
    if messages[-1]["role"] != "user":
        raise DataError("prompt: the last message must be from the user")
    clean = [{"role": m["role"], "content": m["content"]} for m in messages]
    _check_image_turns(clean, "prompt")
    return tpl.segments(clean, tokenizer, True)


def build_prompt(messages: list[dict], tokenizer: Any, template: str) -> str:
    """Inference prompt for `[{"role": "user"|"assistant", "content": str}, ...]`, ending where
    the assistant answers (e.g. "...###Assistant:" for vicuna_v0). Tokenise it with
    `tokenize_prompt`, not as one string, to get the ids the model was trained on."""
    return "".join(s.text for s in _prompt_segments(messages, tokenizer, template))


def tokenize_prompt(messages: list[dict], tokenizer: Any, template: str) -> list[int]:
    """Ids of `build_prompt`'s text, segment by segment as in training; IMAGE_TOKEN_ID for
    "<image>"."""
    tpl = get_template(template)
    segments = [Segment(s.text, False) for s in _prompt_segments(messages, tokenizer, template)]
    ids = _encode_segments(segments, tokenizer, tpl, "prompt").input_ids
    if not ids:
        raise DataError(f"prompt: the {template} template renders nothing for these messages")
    return ids
