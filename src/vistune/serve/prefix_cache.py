"""Reuse of the keys and values of a conversation's earlier turns (prefix caching).

A follow-up turn's prompt starts with the previous prompt (the image and earlier turns) and
the previous answer, so the LLM's keys and values for those positions are already known:
the same idea as vLLM's automatic prefix caching and SGLang's RadixAttention, kept simple
here (a short list of whole sequences, longest common prefix by a vectorised compare, least
recently used evicted past a byte budget).

A sequence is keyed position by position: a text position by its token id, an image
position by a 62-bit digest of the image's pixels (negative, so never a token id). Keys and
values at a position depend only on the positions up to it (causal attention), so any common
prefix of two keys may be reused, whether or not it ends where a turn ended.

A cache has no lock of its own: the scheduler serialises its use (Scheduler.clear_cache).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from vistune.config import AT_LEAST_0
from vistune.data.conversation import IMAGE_TOKEN_ID


def image_digest(image: object) -> int:
    """A negative 62-bit digest of a PIL image's mode, size and pixels."""
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{image.mode}:{image.size}".encode())
    h.update(image.tobytes())
    return -1 - (int.from_bytes(h.digest(), "little") >> 2)


def position_key(ids: list[int], image_digest: int | None, image_tokens: int) -> np.ndarray:
    """One int64 per LLM position: token ids, each IMAGE_TOKEN_ID widened to the image's
    `image_tokens` positions of its digest. # (L,)"""
    parts = []
    for token in ids:
        if token == IMAGE_TOKEN_ID:
            if image_digest is None:
                raise ValueError("the prompt has an image placeholder but no image digest")
            parts.append(np.full(image_tokens, image_digest, dtype=np.int64))
        else:
            parts.append(np.array([token], dtype=np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two keys."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


@dataclass
class _Entry:
    key: np.ndarray  # (n,)
    keys: torch.Tensor  # (layers, Hkv, n, hd)
    values: torch.Tensor  # (layers, Hkv, n, hd)

    @property
    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()


@dataclass
class Hit:
    """`length` reusable positions and their keys and values (views of the cache's copy)."""

    length: int
    keys: torch.Tensor | None  # (layers, Hkv, length, hd)
    values: torch.Tensor | None


class PrefixCache:
    """Keys and values of whole sequences, looked up by longest common prefix."""

    def __init__(self, max_bytes: int) -> None:
        AT_LEAST_0.check("max_bytes", max_bytes)
        self.max_bytes = max_bytes
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._next = 0
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, key: np.ndarray, limit: int) -> Hit:
        """The longest cached prefix of `key`, at most `limit` positions."""
        best, best_id = 0, None
        for entry_id, entry in self._entries.items():
            n = min(common_prefix(entry.key, key), limit)
            if n > best:
                best, best_id = n, entry_id
        if best_id is None:
            return Hit(0, None, None)
        self._entries.move_to_end(best_id)
        entry = self._entries[best_id]
        return Hit(best, entry.keys[:, :, :best], entry.values[:, :, :best])

    def store(self, key: np.ndarray, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Keep the keys and values (layers, Hkv, n, hd) of the sequence `key` (n,): an entry
        it extends is dropped; if an entry already extends it, that entry is kept instead."""
        if keys.shape[2] != len(key) or len(key) == 0:
            raise ValueError(f"{len(key)} key positions but {keys.shape[2]} cached positions")
        for entry_id, entry in list(self._entries.items()):
            shared = common_prefix(entry.key, key)
            if shared == len(key):  # already held, as this sequence or a longer one
                self._entries.move_to_end(entry_id)
                return
            if shared == len(entry.key):  # the new sequence extends this one
                self._drop(entry_id)
        entry = _Entry(key.copy(), keys, values)
        if entry.nbytes > self.max_bytes:
            return
        self._entries[self._next] = entry
        self._next += 1
        self.nbytes += entry.nbytes
        while self.nbytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0

    def _drop(self, entry_id: int) -> None:
        self.nbytes -= self._entries.pop(entry_id).nbytes
