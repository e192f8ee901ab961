"""The stage-2 training mix: instruction data of several response types, by ratio (paper §5.1).

Table 4 of the paper ablates the mix of the three response types: all of them ("full"),
detailed description + complex reasoning, conversation only, and conversation plus 5% of
the detail and 10% of the complex-reasoning data. A ratio is the share of that type's own
file to take: 1 takes every sample, 0.05 a random 5%, 2 every sample twice (1.5: once, plus
a random half). Same files, ratios and seed give the same mix. A `vistune datagen` output
holds several types in one file (ids `<image_id>_<type>`); given for a type, only that
type's samples of it are used.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

from vistune.config import AT_LEAST_0_FINITE
from vistune.data.formats import RESPONSE_TYPES, read_llava_json
from vistune.errors import DataError

DATAGEN_TYPES = ("brief", *RESPONSE_TYPES)
"""The types `vistune datagen` writes, as the suffixes of its sample ids."""

PRESETS: dict[str, dict[str, float]] = {
    "full": {"conversation": 1.0, "detail": 1.0, "complex": 1.0},
    "detail+complex": {"detail": 1.0, "complex": 1.0},
    "conversation": {"conversation": 1.0},
    "conv+5%detail+10%complex": {"conversation": 1.0, "detail": 0.05, "complex": 0.1},
}


def parse_ratios(spec: str | dict[str, float]) -> dict[str, float]:
    """A preset name, or `type=ratio,type=ratio` (e.g. "conversation=1,detail=0.05"), or a dict."""
    if isinstance(spec, dict):
        ratios = dict(spec)
    elif spec in PRESETS:
        ratios = dict(PRESETS[spec])
    elif "=" in spec:
        ratios = _parse_pairs(spec)
    else:
        raise ValueError(
            f"unknown mix {spec!r}; valid: {', '.join(PRESETS)}, or type=ratio,type=ratio"
        )
    for name, ratio in ratios.items():
        AT_LEAST_0_FINITE.check(f"ratio for {name!r}", ratio)
    if not any(ratios.values()):
        raise ValueError(f"mix {spec!r} takes nothing: every ratio is 0")
    return ratios


def _parse_pairs(spec: str) -> dict[str, float]:
    ratios = {}
    for part in spec.split(","):
        name, sep, value = (s.strip() for s in part.partition("="))
        try:
            ratio = float(value)
        except ValueError:
            ratio = None
        if not sep or not name or ratio is None:
            raise ValueError(f"bad ratio {part.strip()!r} in {spec!r}; write type=number")
        ratios[name] = ratio
    return ratios


def planned_count(size: int, ratio: float) -> int:
    """How many samples a ratio takes from a file of `size` samples."""
    whole = math.floor(ratio)
    return whole * size + round((ratio - whole) * size)


def take(samples: list[dict[str, Any]], ratio: float, rng: random.Random) -> list[dict[str, Any]]:
    """Every sample floor(ratio) times, plus a random (ratio - floor) share without repeats."""
    whole = math.floor(ratio)
    part = round((ratio - whole) * len(samples))
    picked = sorted(rng.sample(range(len(samples)), part))  # keep file order in the share
    return samples * whole + [samples[i] for i in picked]


def of_type(samples: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """`name`'s samples of a file that holds several datagen types (some ids end in another
    type's `_<type>`); any other file whole (the official release's ids are image ids)."""

    if not any(_suffix(s) in DATAGEN_TYPES and _suffix(s) != name for s in samples):
        return samples
    return [s for s in samples if _suffix(s) == name]


def _suffix(sample: dict[str, Any]) -> str:
    return str(sample.get("id", "")).rpartition("_")[2]


def mix_with_counts(
    files_by_type: dict[str, Path],
    ratios: dict[str, float] | str,
    seed: int = 0,
    shuffle: bool = True,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The mixed samples and how many came from each type.

    Types with a ratio but no file, or with a file holding none of their samples, raise
    DataError; files whose type has no ratio (or 0) are not read. Samples are kept unchanged (ids may repeat across types, as the same
    image appears in several types in the official data).
    """
    spec = ratios
    ratios = parse_ratios(ratios)
    missing = [name for name, ratio in ratios.items() if ratio > 0 and name not in files_by_type]
    if missing:
        given = ", ".join(sorted(files_by_type)) or "none"
        raise DataError(f"mix {spec!r} needs a file for: {', '.join(missing)} (given: {given})")
    mixed: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    for name in sorted(ratios):
        if ratios[name] == 0:
            continue
        path = files_by_type[name]
        everything = read_llava_json(path)
        samples = of_type(everything, name)
        if not samples:  # a ratio of nothing would leave the type out of the mix unseen
            found = sorted({_suffix(s) for s in everything} & set(DATAGEN_TYPES))
            holds = f" (its types: {', '.join(found)})" if found else " (it is empty)"
            raise DataError(f"{path} holds no {name} samples{holds}")
        chosen = take(samples, ratios[name], random.Random(f"{seed}:{name}"))
        counts[name] = len(chosen)
        mixed.extend(chosen)
    if shuffle:
        random.Random(f"{seed}:shuffle").shuffle(mixed)
    return mixed, counts


def build_mix(
    files_by_type: dict[str, Path], ratios: dict[str, float] | str, seed: int = 0
) -> list[dict[str, Any]]:
    """The stage-2 mix of the given type files with the given ratios (shuffled by seed)."""
    return mix_with_counts(files_by_type, ratios, seed)[0]
