"""Tool calls: how tools reach the prompt, the grammar of a call, and reading calls back.

One format for every model, the one Hermes-style templates (Qwen2.5 and others) use: a call
is ``<tool_call>\\n{"name": NAME, "arguments": ARGS}\\n</tool_call>``. A template that takes
``tools`` renders them itself; for one that does not (SmolLM2's), the tools go into the system
prompt (``TOOLS_PROMPT``), an assistant's earlier calls into its content in that format, and a
tool's result into a user turn inside ``<tool_response>`` tags. While the model writes, the
grammar holds it to "text, or calls in that format" (tool_choice auto), to calls only
(required), to one call of one tool (a named function), or it writes text with the tools left
out of the prompt (none). ``CallReader`` turns the text back into calls as it streams.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

AUTO, NONE, REQUIRED, FUNCTION = "auto", "none", "required", "function"
TRIGGER = "<tool_call>"
_BEGIN = '<tool_call>\n{"name": '
_ARGUMENTS = ', "arguments": '
END = "}\n</tool_call>"
SEPARATOR = "\n"
TOOLS_PROMPT = (
    "You may call functions to answer. They are described by these JSON schemas:\n"
    "<tools>\n{tools}\n</tools>\n"
    "To call a function, answer with one block per call, exactly:\n"
    '<tool_call>\n{{"name": <function name>, "arguments": <the arguments as a JSON object>}}\n'
    "</tool_call>"
)


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]

    def openai(self) -> dict[str, Any]:
        function = {"name": self.name, "parameters": self.parameters}
        if self.description:
            function["description"] = self.description
        return {"type": "function", "function": function}


def render_call(name: str, arguments: str) -> str:
    return f"{_BEGIN}{json.dumps(name)}{_ARGUMENTS}{arguments}{END}"


def template_takes_tools(tokenizer: Any) -> bool:
    return "tools" in (getattr(tokenizer, "chat_template", None) or "")


def prepare_messages(
    messages: list[dict[str, Any]], tools: list[Tool], native: bool
) -> list[dict[str, Any]]:
    """The conversation as the chat template gets it. ``native``: the template takes tools
    (and tool calls and tool messages) itself; else they are written in as text."""
    if native:
        return messages
    out: list[dict[str, Any]] = []
    for message in messages:
        calls = message.get("tool_calls") or []
        if message["role"] == "tool":
            content = f"<tool_response>\n{message['content']}\n</tool_response>"
            out.append({"role": "user", "content": content})
        elif calls:
            written = [
                render_call(c["function"]["name"], c["function"]["arguments"]) for c in calls
            ]
            text = SEPARATOR.join(([message["content"]] if message["content"] else []) + written)
            out.append({"role": "assistant", "content": text})
        else:
            out.append({"role": message["role"], "content": message["content"]})
    if tools:
        listed = TOOLS_PROMPT.format(tools="\n".join(json.dumps(t.openai()) for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{listed}"}
        else:
            out.insert(0, {"role": "system", "content": listed})
    return out


def call_grammar(tools: list[Tool], choice: str, function: str, parallel: bool) -> dict[str, Any]:
    """The structural tag (xgrammar's format) that holds an answer to ``choice``."""
    tags = [
        {
            "type": "tag",
            "begin": f"{_BEGIN}{json.dumps(t.name)}{_ARGUMENTS}",
            # At most one whitespace character in a row: a small model left to it pads
            # arguments with whitespace until it runs out of tokens.
            "content": {
                "type": "json_schema",
                "json_schema": t.parameters,
                "max_whitespace_cnt": 1,
            },
            "end": END,
        }
        for t in tools
        if choice != FUNCTION or t.name == function
    ]
    if choice == FUNCTION:
        return tags[0]
    if choice == REQUIRED:
        # Calls only, each may be followed by a line break (what models write after a call);
        # the answer may end after any call.
        call = {
            "type": "sequence",
            "elements": [
                {"type": "or", "elements": tags},
                {"type": "optional", "content": {"type": "const_string", "value": SEPARATOR}},
            ],
        }
        return {"type": "plus", "content": call} if parallel else call
    return {
        "type": "triggered_tags",
        "triggers": [TRIGGER],
        "tags": tags,
        "at_least_one": False,
        "stop_after_first": not parallel,
    }


@dataclass
class CallDelta:
    """A piece of a call: the first has its id and name, later ones more of its arguments."""

    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass
class CallReader:
    """Splits streamed text into content and tool calls (the text is held to the format by
    the grammar, so reading it is exact)."""

    calls: int = 0
    _buffer: str = ""
    _state: str = "text"  # text, name, arguments
    _after_call: bool = False  # a line break that follows a call is not content
    _out: list[CallDelta] = field(default_factory=list)

    def feed(self, text: str, final: bool = False) -> tuple[str, list[CallDelta]]:
        """Take more text; returns the content and call pieces that are certain so far (all
        of it when ``final``)."""
        self._buffer += text
        content: list[str] = []
        self._out = []
        while True:
            if self._state == "text":
                if self._after_call:
                    if not self._buffer and not final:
                        break
                    self._after_call = False
                    if self._buffer.startswith(SEPARATOR):
                        self._buffer = self._buffer[len(SEPARATOR) :]
                at = self._buffer.find(_BEGIN)
                if at < 0:
                    keep = 0 if final else _partial(self._buffer, _BEGIN)
                    content.append(self._buffer[: len(self._buffer) - keep])
                    self._buffer = self._buffer[len(self._buffer) - keep :]
                    break
                content.append(self._buffer[:at])
                self._buffer = self._buffer[at + len(_BEGIN) :]
                self._state = "name"
            elif self._state == "name":
                at = self._buffer.find(_ARGUMENTS)
                if at < 0:
                    break
                name = json.loads(self._buffer[:at])
                self._out.append(CallDelta(self.calls, f"call_{uuid.uuid4().hex[:24]}", name))
                self._buffer = self._buffer[at + len(_ARGUMENTS) :]
                self._state = "arguments"
            else:
                at = self._buffer.find(END)
                if at < 0:
                    keep = 0 if final else _partial(self._buffer, END)
                    self._arguments(self._buffer[: len(self._buffer) - keep])
                    self._buffer = self._buffer[len(self._buffer) - keep :]
                    break
                self._arguments(self._buffer[:at])
                self._buffer = self._buffer[at + len(END) :]
                self._state = "text"
                self.calls += 1
                self._after_call = True
        return "".join(content), self._out

    def _arguments(self, text: str) -> None:
        if text:
            self._out.append(CallDelta(self.calls, arguments=text))


def _partial(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that begins ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
