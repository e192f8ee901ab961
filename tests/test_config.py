"""vistune.config: the shared configs refuse bad values with one clear message."""

from __future__ import annotations

import pytest

from vistune.config import ClientConfig


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"base_url": "localhost:8000/v1"}, "base_url must start with http:// or https://"),
        ({"timeout": float("nan")}, "timeout must be above 0 and finite, got nan"),
        ({"timeout": float("inf")}, "timeout must be above 0 and finite, got inf"),
        ({"http_retries": -1}, "http_retries must be at least 0, got -1"),
        ({"backoff": float("nan")}, "backoff must be at least 0 and finite, got nan"),
        ({"max_backoff": -1.0}, "max_backoff must be at least 0 and finite, got -1.0"),
        ({"temperature": -1.0}, "temperature must be at least 0 and finite, got -1.0"),
        ({"max_tokens": 0}, "max_tokens must be at least 1, got 0"),
    ],
)
def test_client_config_refuses_bad_values(change, message):
    with pytest.raises(ValueError, match=message):
        ClientConfig(**{"base_url": "http://127.0.0.1:8000/v1", "model": "m", **change})
