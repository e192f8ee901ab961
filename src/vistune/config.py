"""Configuration dataclasses shared across the package.

Configs are frozen: validated on creation, changed only with `dataclasses.replace`, and
saved (as JSON) beside every checkpoint and report. Stage-specific configs (training,
datagen, evaluation) live beside the code that uses them and follow the same rules.

The range rules a number setting is checked against (`AT_LEAST_1`, `AT_LEAST_0`,
`ABOVE_0_FINITE`, `AT_LEAST_0_FINITE`, `ABOVE_0_AT_MOST_1`) live here, one copy of each
rule and its wording: the dataclasses' `__post_init__` check their fields with them (a
ValueError naming the field) and the commands' argparse types (commands/flag_types.py)
check flags with the same ones (argparse names the flag), so `--temperature -1` reads the
same in every command.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

PROJECTORS = ("linear", "mlp2x_gelu", "mlp2x_gelu_pos")
FEATURE_SELECTS = ("patch", "cls_patch")
IMAGE_ASPECTS = ("pad", "resize", "crop")


def check_choice(field: str, value: object, valid: tuple[str, ...]) -> None:
    """Raise ValueError naming the valid choices when `value` is not one of them."""
    if value not in valid:
        raise ValueError(f"unknown {field} {value!r}; valid: {', '.join(valid)}")


@dataclass(frozen=True)
class Range:
    """A range a number setting must lie in, with its one wording."""

    words: str
    """What the value must be, read after `must be` (`at least 1`)."""
    holds: Callable[[Any], bool]
    """True for a value in range. Written `lo <= value < inf` and the like, so that NaN,
    which fails every comparison, is refused too."""

    def refusal(self, value: object) -> str:
        """`must be <words>, got <value>`: the message without the setting's name."""
        return f"must be {self.words}, got {value}"

    def check(self, field: str, value: Any) -> None:
        """Raise ValueError naming `field` when `value` is out of range."""
        if not self.holds(value):
            raise ValueError(f"{field} {self.refusal(value)}")


AT_LEAST_1 = Range("at least 1", lambda v: 1 <= v < math.inf)
"""A count of things that needs one (tokens, workers, a batch)."""
AT_LEAST_0 = Range("at least 0", lambda v: 0 <= v < math.inf)
"""A count that may be none (retries)."""
ABOVE_0_FINITE = Range("above 0 and finite", lambda v: 0 < v < math.inf)
"""A real amount that must be some (seconds to wait for a reply, a learning rate)."""
AT_LEAST_0_FINITE = Range("at least 0 and finite", lambda v: 0 <= v < math.inf)
"""A real amount that may be 0 (a temperature, a delay: time.sleep(nan) is a ValueError)."""
ABOVE_0_AT_MOST_1 = Range("above 0 and at most 1", lambda v: 0 < v <= 1)
"""A share of the whole that cannot be none (nucleus sampling's top_p)."""


@dataclass(frozen=True)
class ModelConfig:
    """How the three parts of LLaVA (paper §4.1, Fig. 1) are put together."""

    projector: str = "mlp2x_gelu"
    """`linear` is the paper's W; `mlp2x_gelu` is LLaVA-1.5's, better and what the HF layout holds; `mlp2x_gelu_pos` adds a learned position row per image token (vistune.model.projector)."""
    vision_layer: int = -2
    """Hidden state to take from the tower; the paper uses the one before the last (§5.2, Table 8)."""
    vision_select: str = "patch"
    """`patch` drops the CLS token (LLaVA's default); `cls_patch` keeps it."""
    image_aspect: str = "pad"
    """`pad` pads to a square with the mean colour (LLaVA-1.5's `pad`); `resize` squashes;
    `crop` scales the shorter side to image_size and keeps the centre square (CLIP's own
    preprocessing, which the paper's LLaVA used)."""
    image_size: int = 224
    """Side of the square image fed to the tower (224 with a /14 patch gives 256 tokens)."""
    template: str = "vicuna_v0"
    """Conversation template used for training and chat (see vistune.data.conversation)."""

    def __post_init__(self) -> None:
        check_choice("projector", self.projector, PROJECTORS)
        check_choice("vision_select", self.vision_select, FEATURE_SELECTS)
        check_choice("image_aspect", self.image_aspect, IMAGE_ASPECTS)
        AT_LEAST_1.check("image_size", self.image_size)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings for chat, the API and batched evaluation."""

    max_new_tokens: int = 256
    """Longest answer in tokens."""
    temperature: float = 0.0
    """0 is greedy; above 0 samples from softmax(logits / temperature)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    stop: tuple[str, ...] = ()
    """Extra stop strings; the template's own stop and the EOS token always stop."""
    seed: int | None = None
    """Seed for sampling (temperature > 0)."""

    def __post_init__(self) -> None:
        AT_LEAST_1.check("max_new_tokens", self.max_new_tokens)
        AT_LEAST_0_FINITE.check("temperature", self.temperature)
        ABOVE_0_AT_MOST_1.check("top_p", self.top_p)


@dataclass(frozen=True)
class ClientConfig:
    """How to reach a chat-completions endpoint and what to ask it for (the teacher of
    `vistune datagen` and `eval build`, the judge of `eval judge` and `eval scienceqa`)."""

    base_url: str = "https://api.openai.com/v1"
    """OpenAI-compatible endpoint, e.g. https://api.openai.com/v1 (key from $OPENAI_API_KEY)."""
    model: str = ""
    """Model name sent to the endpoint."""
    temperature: float = 0.2
    """Sampling temperature."""
    max_tokens: int = 1024
    """Longest reply in tokens."""
    timeout: float = 60.0
    """Seconds per request try."""
    http_retries: int = 5
    """Client-level retries of 5xx/429/timeouts/malformed replies."""
    backoff: float = 1.0
    """First retry delay in seconds (doubles per try, with jitter)."""
    max_backoff: float = 60.0
    """Longest delay between tries, unless the server's Retry-After asks for more."""
    seed: int | None = None
    """Sent as the request's `seed` when set (servers that honour it sample reproducibly)."""

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")
        ABOVE_0_FINITE.check("timeout", self.timeout)
        AT_LEAST_0.check("http_retries", self.http_retries)
        AT_LEAST_0_FINITE.check("backoff", self.backoff)
        AT_LEAST_0_FINITE.check("max_backoff", self.max_backoff)
        AT_LEAST_0_FINITE.check("temperature", self.temperature)
        AT_LEAST_1.check("max_tokens", self.max_tokens)
