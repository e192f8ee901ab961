"""What `vistune serve` listens on and what it accepts (issue 18 items 1, 3 and 6).

Every field is a flag of `vistune serve` (vistune.commands.flags); the limits answer 413
(body, pixels) or 400 (max_tokens) with an OpenAI-style error object. A request holds at
most MAX_IMAGES images (400 past it): the models take one, in the first user turn, as the
paper trains them (§3).
"""

from __future__ import annotations

from dataclasses import dataclass

from vistune.config import ABOVE_0_FINITE, AT_LEAST_0, AT_LEAST_1

MAX_IMAGES = 1
"""Images per request; the engine places one image per conversation."""


@dataclass(frozen=True)
class ServeConfig:
    """The HTTP server's address, access and limits."""

    host: str = "127.0.0.1"
    """Address to bind; loopback only unless told otherwise (0.0.0.0 serves every interface)."""
    port: int = 8000
    """TCP port (0 picks a free one)."""
    api_key: str | None = None
    """Bearer token every /v1 request must carry (also from $VISTUNE_API_KEY)."""
    served_model_name: str = ""
    """Model id in /v1/models and the requests' `model` field."""
    allow_image_host: tuple[str, ...] = ()
    """Hosts whose http(s) image URLs the server may fetch (repeat the flag); none: remote URLs are refused."""
    max_body_bytes: int = 20 << 20
    """Largest request body in bytes (413 past it)."""
    max_pixels: int = 25_000_000
    """Largest image in pixels (width x height, read from its header before decoding; 413 past it)."""
    max_tokens: int = 1024
    """Largest max_tokens a request may ask for (400 past it), and the default when it asks none."""
    max_batch: int = 8
    """Requests decoded together (continuous batching)."""
    max_waiting: int = 64
    """Requests waiting for a place in the batch; past it the server answers 429 with Retry-After."""
    cache_mb: int = 256
    """Memory for reused conversation prefixes (keys and values), in MiB; 0 turns reuse off."""
    fetch_timeout: float = 10.0
    """Seconds to fetch an allowed remote image."""

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        for name in ("max_body_bytes", "max_pixels", "max_tokens", "max_batch"):
            AT_LEAST_1.check(name, getattr(self, name))
        AT_LEAST_0.check("max_waiting", self.max_waiting)
        AT_LEAST_0.check("cache_mb", self.cache_mb)
        ABOVE_0_FINITE.check("fetch_timeout", self.fetch_timeout)
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key is empty; leave it out to serve without one")
        hosts = tuple(h.strip().lower() for h in self.allow_image_host)
        if any(not h or "/" in h for h in hosts):
            raise ValueError(f"allow_image_host takes host names, got {self.allow_image_host!r}")
        object.__setattr__(self, "allow_image_host", hosts)
