"""The decode loop: KV cache, parity with transformers' generate, batching, stops, streaming."""

from __future__ import annotations

import pytest
import torch

from vistune.config import GenerationConfig
from vistune.serve.generate import Generator, TextState, positions_from_mask

PROMPTS = ["the cat sat on", "a red square and a blue", "Human: what is in the image?"]


def embed(llm, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return llm.get_input_embeddings()(torch.tensor([ids]))  # (1, L, D)


def left_pad(llm, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings and mask of a left-padded batch (pad embeddings are random junk on purpose)."""
    width = max(len(r) for r in rows)
    dim = llm.config.hidden_size
    embeds = torch.randn(len(rows), width, dim)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        embeds[i, width - len(r) :] = embed(llm, r)[0]
        mask[i, width - len(r) :] = 1
    return embeds, mask


def ones(x: torch.Tensor) -> torch.Tensor:
    return torch.ones(x.shape[:2], dtype=torch.long)


def test_positions_from_left_padded_mask():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert positions_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_same_with_and_without_kv_cache(tiny_llm, tiny_tokenizer, prompt):
    gen = Generator(tiny_llm, tiny_tokenizer)
    x = embed(tiny_llm, tiny_tokenizer.encode(prompt))
    cfg = GenerationConfig(max_new_tokens=24)
    cached = gen.run(x, ones(x), cfg, use_cache=True)[0]
    full = gen.run(x, ones(x), cfg, use_cache=False)[0]
    assert len(cached.token_ids) > 3
    assert cached.token_ids == full.token_ids
    assert cached.text == full.text


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_matches_transformers_generate(tiny_llm, tiny_tokenizer, prompt):
    ids = tiny_tokenizer.encode(prompt)
    ref = tiny_llm.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        do_sample=False,
        max_new_tokens=24,
    )[0, len(ids) :].tolist()
    if 0 in ref:  # transformers keeps the EOS token (and pads after it); we drop it
        ref = ref[: ref.index(0)]
    x = embed(tiny_llm, ids)
    out = Generator(tiny_llm, tiny_tokenizer).run(x, ones(x), GenerationConfig(max_new_tokens=24))
    assert out[0].token_ids == ref
    assert out[0].finish_reason == ("length" if len(ref) == 24 else "eos")


def test_batched_left_padding_equals_one_by_one(tiny_llm, tiny_tokenizer):
    gen = Generator(tiny_llm, tiny_tokenizer)
    cfg = GenerationConfig(max_new_tokens=16)
    rows = [tiny_tokenizer.encode(p) for p in PROMPTS]
    singles = []
    for r in rows:
        x = embed(tiny_llm, r)
        singles.append(gen.run(x, ones(x), cfg)[0])
    embeds, mask = left_pad(tiny_llm, rows)
    batched = gen.run(embeds, mask, cfg)
    assert [c.token_ids for c in batched] == [c.token_ids for c in singles]
    assert gen.generate(embeds, mask, cfg) == [c.text for c in singles]


def test_finished_rows_leave_the_batch(tiny_llm, tiny_tokenizer):
    """Rows that stop early (different max via a stop on their first token) keep others intact."""
    gen = Generator(tiny_llm, tiny_tokenizer)
    rows = [tiny_tokenizer.encode(p) for p in PROMPTS]
    cfg = GenerationConfig(max_new_tokens=12)
    first = gen.run(*left_pad(tiny_llm, rows[:1]), cfg)[0]
    stop_word = first.text[:1]
    assert stop_word
    embeds, mask = left_pad(tiny_llm, rows)
    batched = gen.run(embeds, mask, cfg, stop=[stop_word])
    assert batched[0].text == "" and batched[0].finish_reason == "stop"
    for i in (1, 2):
        x = embed(tiny_llm, rows[i])
        alone = gen.run(x, ones(x), cfg, stop=[stop_word])[0]
        assert batched[i].token_ids == alone.token_ids


def test_max_tokens_and_eos(tiny_llm, tiny_tokenizer):
    gen = Generator(tiny_llm, tiny_tokenizer)
    x = embed(tiny_llm, tiny_tokenizer.encode(PROMPTS[0]))
    out = gen.run(x, ones(x), GenerationConfig(max_new_tokens=5))[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"
    greedy_first = out.token_ids[0]
    gen.eos = {greedy_first}  # pretend the first greedy token is EOS
    out = gen.run(x, ones(x), GenerationConfig(max_new_tokens=5))[0]
    assert out.token_ids == [] and out.text == "" and out.finish_reason == "eos"


class _CharTokenizer:
    """Decodes ids as UTF-8 bytes: lets the tests script exact token sequences."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def feed(text: str, stop: tuple[str, ...]) -> tuple[str, list[str], bool]:
    state = TextState(_CharTokenizer(), stop)
    pieces = []
    for b in text.encode("utf-8"):
        state.push(b)
        pieces.append(state.take(final=False))
        if state.stopped:
            break
    state.flush()
    pieces.append(state.take(final=True))
    return state.text, pieces, state.stopped


def test_stop_string_trimmed_even_when_split_across_tokens():
    text, pieces, stopped = feed("A cat.### Human: next", ("###",))
    assert stopped and text == "A cat." and "".join(pieces) == "A cat."
    # A prefix of the stop is held back, never shown then retracted.
    assert all("#" not in p for p in pieces)
    text, pieces, stopped = feed("a # b ## c", ("###",))
    assert not stopped and text == "a # b ## c" and "".join(pieces) == text


def test_earliest_of_several_stops_wins():
    text, _, _ = feed("one</s>two###", ("###", "</s>"))
    assert text == "one"


def test_multibyte_characters_released_whole():
    text, pieces, _ = feed("café 東京 😀!", ())
    assert text == "café 東京 😀!"
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text


def test_stop_string_in_generation(tiny_llm, tiny_tokenizer):
    gen = Generator(tiny_llm, tiny_tokenizer)
    x = embed(tiny_llm, tiny_tokenizer.encode(PROMPTS[1]))
    free = gen.run(x, ones(x), GenerationConfig(max_new_tokens=24))[0].text
    stop = free[5:7]
    assert len(stop) == 2
    cut = gen.run(x, ones(x), GenerationConfig(max_new_tokens=24, stop=(stop,)))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == free[: free.index(stop)]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_stream_concatenation_equals_generate(tiny_llm, tiny_tokenizer, prompt):
    gen = Generator(tiny_llm, tiny_tokenizer)
    x = embed(tiny_llm, tiny_tokenizer.encode(prompt))
    cfg = GenerationConfig(max_new_tokens=24)
    stop = ["e "]
    pieces = list(gen.stream(x, ones(x), cfg, stop))
    assert len(pieces) >= 1
    assert "".join(pieces) == gen.generate(x, ones(x), cfg, stop)[0]


def test_sampling_seeded_and_tiny_top_p_is_greedy(tiny_llm, tiny_tokenizer):
    gen = Generator(tiny_llm, tiny_tokenizer)
    embeds, mask = left_pad(tiny_llm, [tiny_tokenizer.encode(p) for p in PROMPTS])
    hot = GenerationConfig(max_new_tokens=16, temperature=5.0, seed=7)
    a = [c.token_ids for c in gen.run(embeds, mask, hot)]
    b = [c.token_ids for c in gen.run(embeds, mask, hot)]
    assert a == b
    other = GenerationConfig(max_new_tokens=16, temperature=5.0, seed=8)
    assert [c.token_ids for c in gen.run(embeds, mask, other)] != a
    greedy = [c.token_ids for c in gen.run(embeds, mask, GenerationConfig(max_new_tokens=16))]
    assert greedy != a
    nucleus = GenerationConfig(max_new_tokens=16, temperature=5.0, top_p=1e-6, seed=3)
    assert [c.token_ids for c in gen.run(embeds, mask, nucleus)] == greedy


def test_bad_shapes_and_stream_batch_rejected(tiny_llm, tiny_tokenizer):
    gen = Generator(tiny_llm, tiny_tokenizer)
    embeds, mask = left_pad(tiny_llm, [[5, 6], [7, 8, 9]])
    with pytest.raises(ValueError, match="one row"):
        list(gen.stream(embeds, mask, GenerationConfig()))
    with pytest.raises(ValueError, match="attention_mask"):
        gen.run(embeds, mask[:, :1], GenerationConfig())


def test_bf16_autocast_runs_and_mostly_agrees(tiny_llm, tiny_tokenizer):
    x = embed(tiny_llm, tiny_tokenizer.encode(PROMPTS[0]))
    cfg = GenerationConfig(max_new_tokens=8)
    ref = Generator(tiny_llm, tiny_tokenizer).run(x, ones(x), cfg)[0].token_ids
    amp = Generator(tiny_llm, tiny_tokenizer, autocast=torch.bfloat16).run(x, ones(x), cfg)[0]
    assert amp.token_ids[:2] == ref[:2]


def test_special_token_stops_match_by_id(tiny_llm, tiny_builders):
    chatml = tiny_builders.build_tiny_tokenizer()
    texts, ids = Generator(tiny_llm, chatml).split_stops(["<|im_end|>", "###", ""])
    assert texts == ("###",)
    assert ids == {chatml.convert_tokens_to_ids("<|im_end|>")}


@pytest.mark.filterwarnings("error:.*past_key_values.*:FutureWarning")
def test_transformers_path_passes_the_cache_by_its_current_name(tiny_llm, tiny_tokenizer):
    """transformers 5.x warns on `past_key_values` (and drops it in 5.40): the KV cache
    goes by the name the model's forward takes."""
    gen = Generator(tiny_llm, tiny_tokenizer, fast=False)
    x = embed(tiny_llm, tiny_tokenizer.encode(PROMPTS[0]))
    cfg = GenerationConfig(max_new_tokens=16)
    cached = gen.run(x, ones(x), cfg, use_cache=True)[0]
    full = gen.run(x, ones(x), cfg, use_cache=False)[0]
    assert len(cached.token_ids) > 3
    assert cached.token_ids == full.token_ids


@pytest.mark.filterwarnings("error:.*past_key_values.*:FutureWarning")
def test_peft_wrapper_generates_as_the_model_it_wraps(tiny_llm, tiny_tokenizer):
    import copy

    from peft import LoraConfig, get_peft_model

    x = embed(tiny_llm, tiny_tokenizer.encode(PROMPTS[1]))
    cfg = GenerationConfig(max_new_tokens=16)
    ref = Generator(tiny_llm, tiny_tokenizer, fast=False).run(x, ones(x), cfg)[0]
    wrapped = get_peft_model(copy.deepcopy(tiny_llm), LoraConfig(r=4, target_modules=["q_proj"]))
    gen = Generator(wrapped, tiny_tokenizer)
    assert gen._cache_kw == "cache"
    out = gen.run(x, ones(x), cfg)[0]  # a fresh adapter (B = 0) changes nothing
    assert out.token_ids == ref.token_ids


def gpt2_llm(vocab_size: int, positions: int):
    """A tiny GPT-2: learned position embeddings, so a position past `positions` is no row."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_embd=32, n_layer=1, n_head=2, vocab_size=vocab_size, n_positions=positions,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(config).eval()


def test_generation_stops_at_the_llms_context(tiny_tokenizer):
    """Prompt + answer never run past the LLM's context (GPT-2's position table would fail
    with an IndexError); reaching it ends the row as `length`."""
    llm = gpt2_llm(len(tiny_tokenizer), positions=32)
    gen = Generator(llm, tiny_tokenizer)
    gen.eos = set()  # the random model must not end its rows early by chance
    rows = [list(range(5, 33)), list(range(5, 25))]  # 28 and 20 tokens
    embeds, mask = left_pad(llm, rows)
    out = gen.run(embeds, mask, GenerationConfig(max_new_tokens=16))
    assert [len(c.token_ids) for c in out] == [4, 4]
    assert {c.finish_reason for c in out} == {"length"}
    x = embed(llm, list(range(5, 37)))  # 32 tokens: no room for an answer
    with pytest.raises(ValueError, match="context of 32"):
        gen.run(x, ones(x), GenerationConfig(max_new_tokens=4))


def test_fast_decoder_buffers_stop_at_the_context(tiny_llm, tiny_tokenizer):
    """A huge max_new_tokens allocates no more than the context (512 positions here)."""
    gen = Generator(tiny_llm, tiny_tokenizer)
    gen.eos = set()
    x = torch.randn(1, 505, tiny_llm.config.hidden_size, generator=torch.Generator().manual_seed(0))
    out = gen.run(x, ones(x), GenerationConfig(max_new_tokens=10**9))[0]
    assert len(out.token_ids) == 7 and out.finish_reason == "length"
    plain = Generator(tiny_llm, tiny_tokenizer, fast=False)
    plain.eos = set()
    assert plain.run(x, ones(x), GenerationConfig(max_new_tokens=50))[0].token_ids == out.token_ids


def test_temperature_edge_values(tiny_llm, tiny_tokenizer):
    with pytest.raises(ValueError, match="temperature"):
        GenerationConfig(temperature=float("nan"))
    with pytest.raises(ValueError, match="temperature"):
        GenerationConfig(temperature=float("inf"))
    gen = Generator(tiny_llm, tiny_tokenizer)
    embeds, mask = left_pad(tiny_llm, [tiny_tokenizer.encode(p) for p in PROMPTS])
    greedy = [c.token_ids for c in gen.run(embeds, mask, GenerationConfig(max_new_tokens=8))]
    for tiny in (1e-45, 1e-300):  # below float32's range: sampling is greedy, not a crash
        cold = GenerationConfig(max_new_tokens=8, temperature=tiny, seed=0)
        assert [c.token_ids for c in gen.run(embeds, mask, cold)] == greedy
