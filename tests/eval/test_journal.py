"""The request journals that make `eval judge`, `eval build` and `--ensemble judge`
resumable: what reaches the disk when, and what a torn file gives back."""

from __future__ import annotations

from vistune.data.records import read_journal
from vistune.eval.journal import appender, prompt_key, rekeyed, requester_id


def test_each_record_is_on_disk_before_the_next_request(tmp_path):
    path = tmp_path / "j.jsonl"
    with appender(path) as log:
        log({"prompt_key": "a", "content": "café"})
        # a kill -9 now loses nothing: the record is already in the file
        assert path.read_bytes() == '{"prompt_key": "a", "content": "café"}\n'.encode()
        log({"prompt_key": "b", "content": "x"})
        assert [r["prompt_key"] for r in read_journal(path)] == ["a", "b"]


def test_a_torn_last_line_is_skipped_and_not_glued_to_the_next_record(tmp_path):
    path = tmp_path / "j.jsonl"
    path.write_bytes(
        b'{"prompt_key": "a"}\n[1, 2]\nnot json\n{"prompt_key": "b", "content": "caf\xc3'
    )
    assert read_journal(path) == [{"prompt_key": "a"}]
    with appender(path) as log:
        log({"prompt_key": "c"})
    assert read_journal(path) == [{"prompt_key": "a"}, {"prompt_key": "c"}]
    assert read_journal(tmp_path / "missing.jsonl") == []


def test_prompt_key_names_the_model_and_the_exact_messages():
    messages = [{"role": "user", "content": "Q?"}]
    key = prompt_key(messages, "gpt|temperature=0.2")
    assert key == prompt_key([{"content": "Q?", "role": "user"}], "gpt|temperature=0.2")
    assert key != prompt_key(messages, "gpt|temperature=0.7")
    assert key != prompt_key([{"role": "user", "content": "Q? "}], "gpt|temperature=0.2")


def test_requester_id_names_every_setting_that_changes_the_reply():
    endpoint = requester_id("gpt", temperature=0.2, max_tokens=1024)
    assert endpoint == "gpt|max_tokens=1024|temperature=0.2"  # sorted, whatever the order
    assert endpoint == requester_id("gpt", max_tokens=1024, temperature=0.2)
    messages = [{"role": "user", "content": "Q?"}]
    larger = requester_id("gpt", temperature=0.2, max_tokens=2048)
    assert prompt_key(messages, endpoint) != prompt_key(messages, larger)
    assert requester_id("rules (not an LLM)") == "rules (not an LLM)"


def test_a_reply_holding_a_unicode_line_separator_is_kept(tmp_path):
    # json.dumps(ensure_ascii=False) leaves U+2028, U+2029 and U+0085 raw; they must not
    # split the record (which would drop a good reply and ask its request on every rerun)
    path = tmp_path / "j.jsonl"
    contents = ["8 7\u2028Assistant 1 is better.", "para\u2029graph", "next\x85line"]
    with appender(path) as log:
        for i, content in enumerate(contents):
            log({"prompt_key": str(i), "content": content})
    assert [r["content"] for r in read_journal(path)] == contents


def test_rekeyed_counts_requests_kept_under_another_key_only():
    expected = {"q1": "k1", "q2": "k2", "q3": "k3"}
    records = [
        {"id": "q1", "prompt_key": "old1"},  # another key only: asked again
        {"id": "q2", "prompt_key": "old2"},
        {"id": "q2", "prompt_key": "k2"},  # ...but q2 also has one under this run's key
        {"id": "q9", "prompt_key": "old9"},  # not a request of this run
        {"prompt_key": "torn"},  # no identity: skipped
    ]
    assert rekeyed(records, expected, lambda r: r["id"]) == 1
    assert rekeyed([], expected, lambda r: r["id"]) == 0


def test_a_byte_order_mark_does_not_cost_the_first_record(tmp_path):
    path = tmp_path / "j.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt_key": "a"}\n{"prompt_key": "b"}\n')
    assert [r["prompt_key"] for r in read_journal(path)] == ["a", "b"]
