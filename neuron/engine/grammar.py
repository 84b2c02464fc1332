"""Output constraints: JSON schemas and tool calls compiled to grammars, and their masks.

xgrammar compiles a constraint once per model (``Grammars.compile``, on a thread of its own,
never the device thread; its compiler caches by content) and each constrained sequence gets
a ``GrammarMatcher`` that the sampler asks for a token bitmask before it samples and advances
with the token it picked. BENCHMARKS.md compares xgrammar with llguidance and outlines-core.

A schema keyword the grammar would ignore is refused (``UnenforceableSchema``), so a client is
never told its schema holds when it does not.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import torch

from neuron import metrics

# JSON Schema keywords the grammar enforces, and the annotations that constrain nothing.
_ENFORCED = {
    "type", "properties", "required", "additionalProperties", "items", "prefixItems", "enum",
    "const", "anyOf", "oneOf", "$ref", "$defs", "definitions", "minItems", "maxItems",
    "minLength", "maxLength", "pattern", "format", "minimum", "maximum", "exclusiveMinimum",
    "exclusiveMaximum", "minProperties", "maxProperties",
}  # fmt: skip
_ANNOTATIONS = {
    "title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
    "readOnly", "writeOnly",
}  # fmt: skip
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")
# Bits of one bitmask word.
_SHIFTS = torch.arange(32, dtype=torch.int32)


class UnenforceableSchema(ValueError):
    """A schema the grammar cannot hold an answer to; the message says where and why."""


def check_schema(schema: Any, where: str = "") -> None:
    """Raise ``UnenforceableSchema`` for a schema that is not an object or uses a keyword the
    grammar would not enforce; ``where`` is the JSON pointer of ``schema``."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise UnenforceableSchema(f"{where or '/'}: a schema must be an object")
    for key, value in schema.items():
        if key not in _ENFORCED and key not in _ANNOTATIONS:
            raise UnenforceableSchema(
                f"{where}/{key}: the keyword {key!r} cannot be enforced while generating"
            )
        if key in _SUBSCHEMA_MAPS:
            if not isinstance(value, dict):
                raise UnenforceableSchema(f"{where}/{key}: must be an object")
            for name, sub in value.items():
                check_schema(sub, f"{where}/{key}/{name}")
        elif key in _SUBSCHEMA_LISTS:
            if not isinstance(value, list):
                raise UnenforceableSchema(f"{where}/{key}: must be a list")
            for i, sub in enumerate(value):
                check_schema(sub, f"{where}/{key}/{i}")
        elif key in ("items", "additionalProperties") and not isinstance(value, bool):
            check_schema(value, f"{where}/{key}")


class Grammars:
    """One model's grammar compiler: its vocabulary, and compiled constraints by content."""

    def __init__(self, model_id: str, tokenizer: Any, vocab_size: int, stop_ids: list[int]):
        import xgrammar

        self._xgr = xgrammar
        self.model_id = model_id
        # The bitmask covers the logits' width: rows beyond the tokenizer (padding) are masked.
        self.vocab_size = vocab_size
        info = xgrammar.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=stop_ids
        )
        self._compiler = xgrammar.GrammarCompiler(info, cache_enabled=True)
        self._lock = threading.Lock()

    # Compact JSON (no whitespace between tokens): a small model left to choose pads its
    # answer with whitespace until it runs out of tokens.
    def json_object(self) -> Any:
        return self._timed(
            "json_object",
            lambda: self._compiler.compile_json_schema(
                '{"type": "object"}', any_whitespace=False, strict_mode=False
            ),
        )

    def json_schema(self, schema: str) -> Any:
        return self._timed(
            "json_schema",
            lambda: self._compiler.compile_json_schema(
                schema, any_whitespace=False, strict_mode=True
            ),
        )

    def structural_tag(self, kind: str, tag: dict[str, Any]) -> Any:
        text = json.dumps({"type": "structural_tag", "format": tag})
        return self._timed(kind, lambda: self._compiler.compile_structural_tag(text))

    def matcher(self, compiled: Any) -> Any:
        return self._xgr.GrammarMatcher(compiled)

    def _timed(self, kind: str, compile: Any) -> Any:
        started = time.monotonic()
        try:
            return compile()
        except RuntimeError as e:  # xgrammar's message ends a C++ trace line: keep its text
            raise UnenforceableSchema(str(e).split("] ", 1)[-1].split(":", 1)[-1].strip()) from e
        finally:
            metrics.GRAMMAR_COMPILE_SECONDS.labels(model=self.model_id, kind=kind).observe(
                time.monotonic() - started
            )


def allowed(matchers: list[Any], vocab_size: int) -> torch.Tensor:
    """The tokens each matcher allows next, as a bool tensor [rows, vocab_size]."""
    import xgrammar

    bitmask = xgrammar.allocate_token_bitmask(len(matchers), vocab_size)
    for row, matcher in enumerate(matchers):
        matcher.fill_next_token_bitmask(bitmask, row)
    bits = (bitmask.unsqueeze(-1) >> _SHIFTS) & 1
    return bits.view(len(matchers), -1)[:, :vocab_size].bool()
