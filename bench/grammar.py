"""Constrained decoding: xgrammar, llguidance and outlines-core side by side.

On the demo model's tokenizer (SmolLM2-135M-Instruct, 49,152 tokens), for each library:
vocabulary preparation (once per model); cold compile of a tool-call schema, of "any JSON
object", and of "free text or ``<tool_call>{"name": ..., "arguments": ...}</tool_call>``"
(tool_choice=auto), each timed up to the first mask of a fresh matcher; then the mask cost
inside a batch of 8: 8 matchers teacher-forced along 8 valid instances of the tool schema,
each step filling the 8 rows' bitmask, applying it to float32 logits [8, 49152] with the
library's own apply function, and advancing each matcher with its token. It checks on the way
that every forced token was allowed, that only EOS is allowed once an instance is complete,
and that logits wider than the tokenizer get their padding columns masked.

    .venv/bin/python -m bench.grammar
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tests.harness import DEMO_GGUF, SHARED_CACHE

BATCH = 8
TOOL_NAME = "get_weather"
TOOL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "number"},
        "location": {
            "type": "object",
            "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
            "required": ["lat", "lon"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["city", "unit", "days", "location", "tags"],
    "additionalProperties": False,
}
ANY_OBJECT: dict[str, Any] = {"type": "object"}
TRIGGER = "<tool_call>"
CALL_BEGIN = f'{TRIGGER}\n{{"name": "{TOOL_NAME}", "arguments": '
CALL_END = "}\n</tool_call>"
CITIES = ["Paris", "São Paulo", "Reykjavík", "New York", "東京", "Nairobi", "Zürich", "Lima"]
INSTANCES = [
    {
        "city": city,
        "unit": ["celsius", "fahrenheit"][i % 2],
        "days": [3, 7.5, 1, 14, 2.25, 5, 10, 0.5][i],
        "location": {"lat": round(-30.5 + 9.25 * i, 4), "lon": round(120.75 - 31.5 * i, 4)},
        "tags": [["rain", "wind"], ["sun"], [], ["snow", "ice", "fog"]][i % 4],
    }
    for i, city in enumerate(CITIES)
]


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - started


def literal(text: str) -> str:
    """``text`` as a regex for outlines-core's Rust regex (Python's re.escape over-escapes)."""
    meta = set("\\.+*?()|[]{}^$#&-~")
    return "".join("\\n" if c == "\n" else "\\" + c if c in meta else c for c in text)


def text_avoiding(word: str) -> str:
    """A regex (no look-around) for the strings that never contain ``word``.

    Needs ``word[0]`` to occur only at its start, as ``<`` does in ``<tool_call>``.
    """
    first = re.escape(word[0])
    prefixes = "|".join(re.escape(word[1:k]) for k in range(1, len(word)))
    breaks = "|".join(
        re.escape(word[1:k]) + f"[^{first}{re.escape(word[k])}]" for k in range(1, len(word))
    )
    return (
        f"(?:[^{first}]|(?:{first}(?:{prefixes}))*{first}(?:{breaks}))*(?:{first}(?:{prefixes}))*"
    )


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer: Any, vocab: int) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
        self.batch = xgr.BatchGrammarMatcher()

    def compiler(self) -> Any:
        return self.xgr.GrammarCompiler(self.info, cache_enabled=False)

    def compile(self, kind: str) -> Any:
        compiler = self.compiler()
        if kind == "schema":
            return compiler.compile_json_schema(TOOL_SCHEMA, strict_mode=True)
        if kind == "object":
            return compiler.compile_builtin_json_grammar()
        tag = {
            "type": "structural_tag",
            "format": {
                "type": "triggered_tags",
                "triggers": [TRIGGER],
                "tags": [
                    {
                        "type": "tag",
                        "begin": CALL_BEGIN,
                        "content": {"type": "json_schema", "json_schema": TOOL_SCHEMA},
                        "end": CALL_END,
                    }
                ],
            },
        }
        return compiler.compile_structural_tag(json.dumps(tag))

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def allocate(self, rows: int, vocab: int) -> torch.Tensor:
        return self.xgr.allocate_token_bitmask(rows, vocab)

    def fill(self, matchers: list[Any], bitmask: torch.Tensor) -> None:
        self.batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        self.xgr.apply_token_bitmask_inplace(logits, bitmask)

    def accept(self, matchers: list[Any], tokens: list[int]) -> list[bool]:
        return list(self.xgr.BatchGrammarMatcher.batch_accept_token(matchers, tokens))


class LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer: Any, vocab: int) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg = llguidance
        self.llt = llguidance.torch
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
        self.executor = llguidance.LLExecutor()

    def compile(self, kind: str) -> Any:
        matcher = self.llg.LLMatcher
        if kind == "schema":
            grammar = matcher.grammar_from_json_schema(TOOL_SCHEMA)
        elif kind == "object":
            grammar = matcher.grammar_from_json_schema(ANY_OBJECT)
        else:
            # Text that never contains the trigger, then calls, each followed by such text.
            grammar = matcher.grammar_from_lark(
                "start: TEXT (call TEXT)*\n"
                f"call: {json.dumps(CALL_BEGIN)} %json {json.dumps(TOOL_SCHEMA)} "
                f"{json.dumps(CALL_END)}\n"
                f"TEXT: /(?s:.*)/ & ~/(?s:.*){re.escape(TRIGGER)}(?s:.*)/\n"
            )
        # llguidance compiles while it builds the matcher (and lazily on later masks).
        return self.matcher(grammar)

    def matcher(self, grammar: Any) -> Any:
        if isinstance(grammar, self.llg.LLMatcher):
            return grammar.deep_copy()
        matcher = self.llg.LLMatcher(self.tokenizer, grammar)
        if matcher.is_error():
            raise RuntimeError(matcher.get_error())
        return matcher

    def allocate(self, rows: int, vocab: int) -> torch.Tensor:
        return self.llt.allocate_token_bitmask(rows, vocab)

    def fill(self, matchers: list[Any], bitmask: torch.Tensor) -> None:
        self.llt.fill_next_token_bitmask_par(
            self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask
        )

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        self.llt.apply_token_bitmask_inplace(logits, bitmask)

    def accept(self, matchers: list[Any], tokens: list[int]) -> list[bool]:
        return [m.consume_token(t) for m, t in zip(matchers, tokens, strict=True)]


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tokenizer: Any, vocab: int) -> None:
        import outlines_core
        import outlines_core.kernels.torch as kernels
        from outlines_core.json_schema import build_regex_from_schema
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        self.oc = outlines_core
        self.kernels = kernels
        self.regex = build_regex_from_schema
        # outlines-core wants each token's bytes; the byte-level BPE strings map back to them.
        # Special tokens are left out (a JSON string must not be able to hold <|im_start|>).
        decoder = {c: b for b, c in bytes_to_unicode().items()}
        special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        tokens: dict[bytes, list[int]] = {}
        for token, index in tokenizer.get_vocab().items():
            if index not in special:
                tokens.setdefault(bytes(decoder[c] for c in token), []).append(index)
        self.eos = tokenizer.eos_token_id
        self.vocabulary = outlines_core.Vocabulary(self.eos, tokens)

    def compile(self, kind: str) -> Any:
        if kind == "schema":
            regex = self.regex(json.dumps(TOOL_SCHEMA))
        elif kind == "object":
            regex = self.regex(json.dumps(ANY_OBJECT))
        else:
            text = text_avoiding(TRIGGER)
            call = literal(CALL_BEGIN) + self.regex(json.dumps(TOOL_SCHEMA)) + literal(CALL_END)
            regex = f"{text}(?:{call}{text})*"
        return self.oc.Index(regex, self.vocabulary)

    def matcher(self, index: Any) -> Any:
        return self.oc.Guide(index)

    def allocate(self, rows: int, vocab: int) -> torch.Tensor:
        return torch.full((rows, (vocab + 31) // 32), -1, dtype=torch.int32)

    def fill(self, matchers: list[Any], bitmask: torch.Tensor) -> None:
        for i, guide in enumerate(matchers):
            self.kernels.fill_next_token_bitmask(guide, bitmask[i : i + 1])

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        self.kernels.apply_token_bitmask_inplace(logits, bitmask)

    def accept(self, matchers: list[Any], tokens: list[int]) -> list[bool]:
        accepted = []
        for guide, token in zip(matchers, tokens, strict=True):
            try:
                guide.advance(token, return_tokens=False)
                accepted.append(True)
            except Exception:
                # A finished Guide refuses to advance on EOS; EOS is allowed by its mask.
                accepted.append(token == self.eos and guide.is_finished())
        return accepted


LIBRARIES = (XGrammar, LLGuidance, OutlinesCore)


def allowed(bitmask: torch.Tensor, row: int, vocab: int) -> torch.Tensor:
    shifts = torch.arange(32, dtype=torch.int32)
    bits = (bitmask[row].unsqueeze(-1) >> shifts) & 1
    return bits.flatten()[:vocab].bool()


def teacher_force(
    lib: Any, compiled: Any, sequences: list[list[int]], vocab: int
) -> dict[str, Any]:
    """Time fill + apply + accept per step for a batch; check every forced token was allowed."""
    matchers = [lib.matcher(compiled) for _ in sequences]
    bitmask = lib.allocate(len(sequences), vocab)
    logits = torch.zeros(len(sequences), vocab, dtype=torch.float32)
    per_row: list[float] = []
    fill_share: list[float] = []
    apply_share: list[float] = []
    violations = 0
    steps = max(len(s) for s in sequences)
    for step in range(steps):
        rows = [i for i, s in enumerate(sequences) if step < len(s)]
        active = [matchers[i] for i in rows]
        tokens = [sequences[i][step] for i in rows]
        rows_mask = bitmask[: len(rows)]
        rows_logits = logits[: len(rows)]
        rows_logits.zero_()
        started = time.perf_counter()
        lib.fill(active, rows_mask)
        filled = time.perf_counter()
        lib.apply(rows_logits, rows_mask)
        applied = time.perf_counter()
        ok = lib.accept(active, tokens)
        ended = time.perf_counter()
        per_row.append((ended - started) / len(rows) * 1e6)
        fill_share.append((filled - started) / len(rows) * 1e6)
        apply_share.append((applied - filled) / len(rows) * 1e6)
        for j, token in enumerate(tokens):
            if rows_logits[j, token] == float("-inf") or not ok[j]:
                violations += 1
    return {
        "per_row": per_row,
        "fill": fill_share,
        "apply": apply_share,
        "violations": violations,
        "matchers": matchers,
    }


def only_eos_after(lib: Any, compiled: Any, tokens: list[int], eos: int, vocab: int) -> bool:
    matcher = lib.matcher(compiled)
    for token in tokens:
        if not lib.accept([matcher], [token])[0]:
            return False
    bitmask = lib.allocate(1, vocab)
    lib.fill([matcher], bitmask)
    return set(allowed(bitmask, 0, vocab).nonzero().flatten().tolist()) == {eos}


def accepts(lib: Any, compiled: Any, tokens: list[int], vocab: int) -> bool:
    """Whether the grammar lets these tokens through, each allowed by the mask before it."""
    matcher = lib.matcher(compiled)
    bitmask = lib.allocate(1, vocab)
    for token in tokens:
        lib.fill([matcher], bitmask)
        if not allowed(bitmask, 0, vocab)[token]:
            return False
        if not lib.accept([matcher], [token])[0]:
            return False
    return True


def padding_masked(lib: Any, vocab: int) -> bool:
    """Logits 64 columns wider than the tokenizer: the library's apply must mask them."""
    bitmask = lib.allocate(1, vocab)
    logits = torch.zeros(1, vocab + 64)
    try:
        lib.apply(logits, bitmask)
    except Exception:
        return False
    return bool((logits[0, vocab:] == float("-inf")).all())


def compile_to_first_mask(lib: Any, kind: str, vocab: int) -> Any:
    """Compile cold and fill a fresh matcher's first mask: the latency a new request sees."""
    grammar = lib.compile(kind)
    bitmask = lib.allocate(1, vocab)
    lib.fill([lib.matcher(grammar)], bitmask)
    return grammar


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(args: argparse.Namespace) -> str:
    from transformers import AutoTokenizer

    from neuron.sources import materialise_gguf

    model_dir = materialise_gguf(DEMO_GGUF, SHARED_CACHE)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
    eos = tokenizer.eos_token_id
    instances = [json.dumps(x, ensure_ascii=False) for x in INSTANCES]
    sequences = [[*tokenizer.encode(text, add_special_tokens=False), eos] for text in instances]
    call_text = CALL_BEGIN + instances[0] + CALL_END
    free_text = "Sure, it is sunny in Paris <b>today</b>; no tool needed."
    bad_call = CALL_BEGIN + '{"city": 12'
    lines = [
        f"tokenizer: {len(tokenizer)} tokens, logits width {vocab}, EOS {eos}; "
        f"instances {[len(s) for s in sequences]} tokens (with EOS); torch threads "
        f"{torch.get_num_threads()}"
    ]
    rows = []
    for cls in LIBRARIES:
        lib, prepare = _timed(lambda cls=cls: cls(tokenizer, vocab))
        compiles = {}
        compiled = {}
        for kind in ("schema", "object", "tool_or_text"):
            try:
                compiled[kind], compiles[kind] = _timed(
                    lambda lib=lib, kind=kind: compile_to_first_mask(lib, kind, vocab)
                )
            except Exception as e:  # a library that cannot express it
                compiled[kind], compiles[kind] = None, float("nan")
                lines.append(f"{lib.name} {kind}: {type(e).__name__}: {str(e)[:200]}")
        # The apply kernels of llguidance and outlines-core are torch.compile'd: warm them.
        warm, warm_s = _timed(lambda lib=lib: padding_masked(lib, vocab))
        for _ in range(args.warmups):
            teacher_force(lib, compiled["schema"], sequences, vocab)
        forced = teacher_force(lib, compiled["schema"], sequences, vocab)
        eos_only = all(
            only_eos_after(lib, compiled["schema"], s[:-1], eos, vocab) for s in sequences
        )
        tool_or_text = compiled["tool_or_text"]
        call_ok = tool_or_text is not None and (
            accepts(lib, tool_or_text, tokenizer.encode(call_text, add_special_tokens=False), vocab)
            and accepts(
                lib, tool_or_text, tokenizer.encode(free_text, add_special_tokens=False), vocab
            )
            and not accepts(
                lib, tool_or_text, tokenizer.encode(bad_call, add_special_tokens=False), vocab
            )
        )
        rows.append(
            (
                lib.name,
                prepare,
                compiles,
                forced,
                eos_only,
                call_ok,
                warm,
                warm_s,
            )
        )
    lines.append("")
    lines.append(
        "| library | vocab prep s | compile tool schema ms | compile json_object ms "
        "| compile text-or-tool-call ms | step µs/row/token p50 | p99 "
        "| fill p50 | fill p99 | apply p50 "
        "| forced tokens rejected | only EOS at end | text-or-call ok | padding masked |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, prepare, compiles, forced, eos_only, call_ok, warm, warm_s in rows:
        lines.append(
            f"| {name} | {prepare:.2f} | {compiles['schema'] * 1e3:.1f} "
            f"| {compiles['object'] * 1e3:.1f} | {compiles['tool_or_text'] * 1e3:.1f} "
            f"| {statistics.median(forced['per_row']):.1f} "
            f"| {percentile(forced['per_row'], 0.99):.1f} "
            f"| {statistics.median(forced['fill']):.1f} "
            f"| {percentile(forced['fill'], 0.99):.1f} "
            f"| {statistics.median(forced['apply']):.1f} "
            f"| {forced['violations']} | {'yes' if eos_only else 'NO'} "
            f"| {'yes' if call_ok else 'NO'} | {'yes' if warm else 'NO'} (first apply {warm_s:.1f} s) |"
        )
    if args.decode_step:
        from bench.generation import bare_step_ceiling

        ceiling = bare_step_ceiling(model_dir, [BATCH], "neuron", "bfloat16")[BATCH]
        lines.append("")
        lines.append(
            f"reference: neuron's bare batch-{BATCH} decode step (bench.generation) "
            f"{BATCH / ceiling * 1e3:.1f} ms, {1e6 / ceiling:.0f} µs per row"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--warmups", type=int, default=1, help="teacher-forced passes untimed")
    parser.add_argument("--no-decode-step", dest="decode_step", action="store_false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(run(parser.parse_args()))


if __name__ == "__main__":
    main()
