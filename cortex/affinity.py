"""Which neuron most likely holds a prompt's beginning in its prefix cache.

A neuron keeps the KV of the prompts it served (its prefix cache), so a request whose prompt
begins as an earlier one did (the next turn of a chat, an agent's fixed system prompt and
tools) is cheaper where that earlier one ran. cortex keeps an approximate index of recent
prompt beginnings: a prompt is cut into blocks (each message's role and content, and within
long content every ``BLOCK`` characters), each block's key hashes it with every block before
it, and the index maps a key to the neuron that last served a prompt with that beginning. The
longest beginning found names the neuron to prefer. The index is bounded (least recently used
keys go first) and lives in cortex's memory only: after a restart, or when a neuron evicts
its cache, it is wrong for a while, which costs a cache miss and nothing else.

Cache affinity yields to load: the preferred neuron is chosen only while its requests for the
model exceed the least loaded neuron's by at most ``routing.balance_margin`` (SGLang's
gateway's cache_aware policy balances the same way).
"""

from __future__ import annotations

from collections import OrderedDict

from helexa.neuron.v1 import neuron_pb2 as pb

BLOCK = 256  # characters of content per block


def prefix_keys(request: pb.GenerateRequest) -> list[int]:
    """The keys of ``request``'s prompt beginnings, shortest first (the model and tools
    included, as they come before the messages in a templated prompt)."""
    key = hash((request.model, tuple(t.name for t in request.tools)))
    keys = []
    if request.WhichOneof("input") == "prompt":
        parts: list[tuple[str, str]] = [("", request.prompt)]
    else:
        parts = [(m.role, m.content) for m in request.chat.messages]
    for role, content in parts:
        key = hash((key, role))
        for start in range(0, max(len(content), 1), BLOCK):
            key = hash((key, content[start : start + BLOCK]))
            keys.append(key)
    return keys


class PrefixIndex:
    """The neuron that last served each recent prompt beginning, at most ``entries`` keys."""

    def __init__(self, entries: int) -> None:
        self.entries = entries
        self._where: OrderedDict[int, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._where)

    def holder(self, keys: list[int], neurons: set[str]) -> tuple[str, int] | None:
        """The neuron among ``neurons`` holding the longest of ``keys``' beginnings, and how
        many blocks of it; None when none does."""
        for depth in range(len(keys), 0, -1):
            name = self._where.get(keys[depth - 1])
            if name is not None and name in neurons:
                return name, depth
        return None

    def served(self, keys: list[int], neuron: str) -> None:
        """``neuron`` served a prompt with these beginnings: it holds them now."""
        where = self._where
        for key in keys:
            where[key] = neuron
            where.move_to_end(key)
        while len(where) > self.entries:
            where.popitem(last=False)
