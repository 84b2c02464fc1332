"""Prompt beginnings the engine has run before, kept with their keys and values, so that a
prompt starting like an earlier one (the chat template's system prompt, an agent's fixed
instructions, the conversation so far) runs only its new tokens.

A radix tree over token ids: each node holds a run of tokens and their keys and values
(``[layers, 2, kv_heads, tokens, head_dim]``), and the path from the root to a node spells a
prompt's beginning, so a shared beginning is held once. Keys and values at a position depend
only on the tokens up to it, so any beginning of a cached run can be reused. Bounded in
bytes: past the bound, the least recently used leaves go first. Only the device worker
thread touches it.
"""

from __future__ import annotations

import torch


class _Node:
    __slots__ = ("children", "kv", "last_used", "parent", "tokens")

    def __init__(self, tokens: tuple[int, ...], kv: torch.Tensor | None, parent: _Node | None):
        self.tokens = tokens
        self.kv = kv
        self.parent = parent
        self.children: dict[int, _Node] = {}
        self.last_used = 0

    @property
    def bytes(self) -> int:
        return 0 if self.kv is None else self.kv.numel() * self.kv.element_size()


class PrefixCache:
    """Keys and values of prompt beginnings, at most ``budget`` bytes of them (0: off)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.bytes = 0
        self._root = _Node((), None, None)
        self._clock = 0  # orders uses, for least-recently-used eviction

    def match(self, ids: list[int]) -> tuple[int, list[torch.Tensor]]:
        """The longest cached beginning of ``ids``: its length in tokens and the pieces of its
        keys and values in order (``[layers, 2, kv_heads, n, head_dim]`` each)."""
        self._clock += 1
        node, matched, pieces = self._root, 0, []
        while matched < len(ids):
            child = node.children.get(ids[matched])
            if child is None:
                break
            n = _common(child.tokens, ids, matched)
            child.last_used = self._clock
            assert child.kv is not None
            pieces.append(child.kv if n == len(child.tokens) else child.kv[:, :, :, :n])
            matched += n
            if n < len(child.tokens):
                break
            node = child
        return matched, pieces

    def insert(self, ids: list[int], kv: torch.Tensor) -> None:
        """Keep ``kv`` (``[layers, 2, kv_heads, len(ids), head_dim]``) as the keys and values of
        ``ids``; the part already held is not stored again."""
        if self.budget <= 0 or not ids:
            return
        self._clock += 1
        node, pos = self._root, 0
        while pos < len(ids):
            child = node.children.get(ids[pos])
            if child is None:
                rest = kv[:, :, :, pos:]
                if rest.numel() * rest.element_size() > self.budget:
                    return  # it would push out everything else and still not fit
                leaf = _Node(tuple(ids[pos:]), rest.clone(), node)
                leaf.last_used = self._clock
                node.children[ids[pos]] = leaf
                self.bytes += leaf.bytes
                break
            n = _common(child.tokens, ids, pos)
            child.last_used = self._clock
            if n < len(child.tokens):
                _split(child, n)
            pos += n
            node = child
        self._evict()

    def clear(self) -> None:
        self._root = _Node((), None, None)
        self.bytes = 0

    def _evict(self) -> None:
        """Drop least recently used leaves until the cache is within its budget."""
        while self.bytes > self.budget:
            leaves = sorted(_leaves(self._root), key=lambda n: n.last_used)
            for leaf in leaves:
                if self.bytes <= self.budget:
                    return
                assert leaf.parent is not None
                del leaf.parent.children[leaf.tokens[0]]
                self.bytes -= leaf.bytes
                leaf.kv = None


def _common(tokens: tuple[int, ...], ids: list[int], start: int) -> int:
    """How many of ``tokens`` match ``ids`` from ``start`` on."""
    n = min(len(tokens), len(ids) - start)
    for i in range(n):
        if tokens[i] != ids[start + i]:
            return i
    return n


def _split(node: _Node, n: int) -> None:
    """Cut ``node`` after its first ``n`` tokens; the rest becomes its only child."""
    assert node.kv is not None
    rest = _Node(node.tokens[n:], node.kv[:, :, :, n:].clone(), node)
    rest.children, rest.last_used = node.children, node.last_used
    for child in rest.children.values():
        child.parent = rest
    node.tokens, node.kv = node.tokens[:n], node.kv[:, :, :, :n].clone()
    node.children = {rest.tokens[0]: rest}


def _leaves(root: _Node) -> list[_Node]:
    found, stack = [], list(root.children.values())
    while stack:
        node = stack.pop()
        if node.children:
            stack.extend(node.children.values())
        else:
            found.append(node)
    return found
