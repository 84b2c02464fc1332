"""The answers of ``/v1/responses`` that cortex keeps, for ``previous_response_id`` and
``GET``/``DELETE /v1/responses/{id}``: in memory, bounded in count, age and bytes
(``[responses]`` in cortex.toml), the oldest out first.

Each entry holds the response as it was answered and the conversation it ends (its input
messages, those of the responses before it included, then its output as an assistant
message), which a later request that names it continues.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cortex.config import ResponsesConfig
from helexa.neuron.v1 import neuron_pb2 as pb


@dataclass(frozen=True)
class Kept:
    """One kept response: its JSON body, the conversation it ends, and its size in bytes."""

    response: dict[str, Any]
    conversation: list[pb.ChatMessage]
    size: int
    at: float  # the store's clock when it was kept
    owner: bytes  # the digest of the API key that made it (b"" without keys)


class ResponseStore:
    """Kept responses by id, oldest first."""

    def __init__(
        self, config: ResponsesConfig, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self._clock = clock
        self._kept: OrderedDict[str, Kept] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._kept)

    def put(
        self,
        id: str,
        response: dict[str, Any],
        conversation: list[pb.ChatMessage],
        size: int,
        owner: bytes = b"",
    ) -> None:
        """Keep ``response`` (``size``: its bytes as JSON) and its conversation under ``id``,
        for ``owner`` alone; the oldest go to stay within the bounds. One larger than
        ``max_bytes`` is not kept."""
        size += sum(m.ByteSize() for m in conversation)
        if self.config.max_stored == 0 or size > self.config.max_bytes:
            return
        self.delete(id, owner)
        self._kept[id] = Kept(response, conversation, size, self._clock(), owner)
        self.bytes += size
        self._expire()
        while len(self._kept) > self.config.max_stored or self.bytes > self.config.max_bytes:
            self._drop_oldest()

    def get(self, id: str, owner: bytes = b"") -> Kept | None:
        """The response kept under ``id`` for ``owner``; ``None`` if unknown, another's,
        deleted or older than ``max_age``."""
        self._expire()
        kept = self._kept.get(id)
        return kept if kept is not None and kept.owner == owner else None

    def delete(self, id: str, owner: bytes = b"") -> bool:
        """Forget ``id``; whether ``owner`` had it kept (and not expired)."""
        if self.get(id, owner) is None:
            return False
        self.bytes -= self._kept.pop(id).size
        return True

    def _expire(self) -> None:
        oldest = self._clock() - self.config.max_age
        while self._kept and next(iter(self._kept.values())).at <= oldest:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        _, kept = self._kept.popitem(last=False)
        self.bytes -= kept.size
