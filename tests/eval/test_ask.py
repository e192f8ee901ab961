"""vistune.eval.ask: the one ask-parse-retry loop of the judge, the ensemble and the builder."""

from __future__ import annotations

import pytest

from vistune.chat_client import BadResponseError, EndpointDownError
from vistune.errors import ModelDirError
from vistune.eval.ask import Unusable, ask


def replies(*items):
    """A `send` that returns (or raises) `items` in turn."""
    queue = list(items)

    def send() -> str:
        item = queue.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    return send


def number(text: str) -> int:
    if not text.isdigit():
        raise Unusable(f"not a number: {text!r}")
    return int(text)


def test_asks_again_until_the_reply_parses_and_reports_every_try():
    tries = []
    out = ask(replies("seven", BadResponseError("empty"), "7"), number, 2, tries.append)
    assert (out.value, out.content, out.attempts, out.error) == (7, "7", 3, None)
    assert [(t.attempt, t.content, t.value) for t in tries] == [
        (0, "seven", None), (1, None, None), (2, "7", 7)]  # fmt: skip
    assert isinstance(tries[0].error, Unusable) and isinstance(tries[1].error, BadResponseError)


def test_gives_up_after_retries_with_the_last_reply_and_reason():
    out = ask(replies("a", "b", BadResponseError("cut")), number, 2)
    assert out.value is None and out.attempts == 3
    assert out.content == "b"  # the last reply received
    assert isinstance(out.error, BadResponseError)


def test_an_endpoint_down_on_the_last_try_stops_the_run():
    tries = []
    with pytest.raises(EndpointDownError):
        ask(replies(EndpointDownError("503"), EndpointDownError("503")), number, 1, tries.append)
    assert len(tries) == 2  # both logged before the stop
    out = ask(replies(EndpointDownError("503"), "4"), number, 1)  # down once: asked again
    assert out.value == 4


def test_other_errors_are_not_a_failed_try():
    with pytest.raises(ModelDirError):  # a teacher folder that cannot load is not retried
        ask(replies(ModelDirError("no weights"), "1"), number, 2, failures=(BadResponseError,))
