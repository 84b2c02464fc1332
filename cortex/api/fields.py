"""Request fields, parsed once: typed readers of a JSON body's values and the agents' fields
(tools, tool choice, tool calls in a conversation, the output constraint, logit bias) turned
into the proto.

Every reader takes the field's name as the client spelt it (``key``, a path such as
``tools[2].function.name``) and raises ``BadRequest`` naming it, so a surface names its own
fields. ``None`` (JSON null) means the field was not given, as the OpenAI SDK and curl users
both expect.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from cortex.errors import BadRequest
from helexa.neuron.v1 import neuron_pb2 as pb

# OpenAI's pattern for function and response-format names.
NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
# What one request may hold: past these it is a 400, and parsing it stays a small share of
# the event loop's time (the loop relays every stream's tokens meanwhile).
MAX_MESSAGES = 2048
MAX_PARTS = 256  # content parts of one message
MAX_TOOLS = 128
MAX_TOOL_CALLS = 128  # calls in one assistant message of the history
MAX_LOGIT_BIAS = 1024
MAX_TOP_LOGPROBS = 20
_TOKEN_ID = re.compile(r"[0-9]{1,10}")
_MODES = {
    "auto": pb.TOOL_CHOICE_MODE_AUTO,
    "none": pb.TOOL_CHOICE_MODE_NONE,
    "required": pb.TOOL_CHOICE_MODE_REQUIRED,
}


def at(prefix: str, name: str) -> str:
    """The path of ``name`` inside ``prefix`` (``prefix.name``, or ``name`` at the top)."""
    return f"{prefix}.{name}" if prefix else name


def integer(body: dict[str, Any], name: str, prefix: str = "") -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        key = at(prefix, name)
        raise BadRequest(f"'{key}' must be an integer, got {value!r}", param=key)
    return value


def number(
    body: dict[str, Any], name: str, low: float, high: float, prefix: str = ""
) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    key = at(prefix, name)
    if isinstance(value, bool) or not isinstance(value, int | float) or _nan(value):
        raise BadRequest(f"'{key}' must be a number, got {value!r}", param=key)
    if not low <= value <= high:
        raise BadRequest(f"'{key}' must be between {low:g} and {high:g}, got {value}", param=key)
    return float(value)


def _nan(value: float) -> bool:
    return isinstance(value, float) and math.isnan(value)


def boolean(body: dict[str, Any], name: str, prefix: str = "") -> bool | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, bool):
        key = at(prefix, name)
        raise BadRequest(f"'{key}' must be true or false, got {value!r}", param=key)
    return value


def string(body: dict[str, Any], name: str, prefix: str = "", required: bool = False) -> str:
    """A string field; "" when absent and not ``required``."""
    value = body.get(name)
    key = at(prefix, name)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value):
        need = "a non-empty string" if required else "a string"
        raise BadRequest(f"'{key}' must be {need}, got {value!r}", param=key)
    return value


def obj(value: Any, key: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRequest(f"'{key}' must be an object, got {_short(value)}", param=key)
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def name(body: dict[str, Any], field: str, prefix: str) -> str:
    """A function or schema name: 1 to 64 letters, digits, underscores and dashes."""
    value = string(body, field, prefix, required=True)
    if NAME.fullmatch(value) is None:
        key = at(prefix, field)
        raise BadRequest(
            f"'{key}' must be 1 to 64 letters, digits, underscores or dashes, got {value!r}",
            param=key,
        )
    return value


def schema_text(value: Any, key: str) -> str:
    """A JSON schema (an object) as the text the neuron compiles."""
    try:
        return json.dumps(obj(value, key), separators=(",", ":"), allow_nan=False)
    except ValueError:  # Python's json reads NaN and Infinity; JSON has neither
        raise BadRequest(f"'{key}' holds NaN or Infinity, which JSON has not", param=key) from None
    except RecursionError:
        raise BadRequest(f"'{key}' is nested too deeply", param=key) from None


def items(value: Any, key: str, what: str, limit: int) -> list[Any]:
    """A list of at most ``limit`` things (``what`` names them); [] when not given."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadRequest(f"'{key}' must be a list of {what}", param=key)
    if len(value) > limit:
        raise BadRequest(f"'{key}' takes at most {limit} {what}, got {len(value)}", param=key)
    return value


def _function(value: Any, key: str, typed: bool = True) -> dict[str, Any]:
    """The ``function`` object of ``{"type": "function", "function": {...}}`` (the type may
    be left out where not ``typed``)."""
    given = obj(value, key)
    kind = given.get("type") if typed else given.get("type", "function")
    if kind != "function":
        raise BadRequest(
            f"'{key}.type' must be 'function' (the only kind of tool served), got {kind!r}",
            param=f"{key}.type",
        )
    return obj(given.get("function"), f"{key}.function")


# ---- tools ----


def tools(value: Any, key: str = "tools") -> list[pb.Tool]:
    """OpenAI's ``tools``: function definitions, at most ``MAX_TOOLS``, names unique."""
    out: list[pb.Tool] = []
    seen: set[str] = set()
    for i, item in enumerate(items(value, key, "tools", MAX_TOOLS)):
        out.append(function_tool(_function(item, f"{key}[{i}]"), f"{key}[{i}].function", seen))
    return out


def function_tool(
    function: dict[str, Any], where: str, seen: set[str], schema_key: str = "parameters"
) -> pb.Tool:
    """One function's ``name`` (not in ``seen``), ``description``, ``strict`` and its schema
    under ``schema_key`` (Anthropic's ``input_schema``; absent: any object)."""
    tool_name = name(function, "name", where)
    if tool_name in seen:
        raise BadRequest(
            f"'{where}.name': the tool name {tool_name!r} is listed twice", param=f"{where}.name"
        )
    seen.add(tool_name)
    schema = function.get(schema_key)
    boolean(function, "strict", where)  # calls always follow the schema
    return pb.Tool(
        name=tool_name,
        description=string(function, "description", where),
        parameters="" if schema is None else schema_text(schema, f"{where}.{schema_key}"),
    )


def tool_choice(value: Any, names: list[str], key: str = "tool_choice") -> pb.ToolChoice | None:
    """``auto``, ``none``, ``required`` or ``{"type": "function", "function": {"name"}}``
    naming one of ``names``; ``None`` when not given."""
    if value is None:
        return None
    if isinstance(value, str):
        mode = _MODES.get(value)
        if mode is None:
            raise BadRequest(
                f"'{key}' must be 'auto', 'none', 'required' or a function, got {value!r}",
                param=key,
            )
        if mode == pb.TOOL_CHOICE_MODE_REQUIRED and not names:
            raise BadRequest(f"'{key}' is 'required' but no 'tools' are given", param=key)
        return pb.ToolChoice(mode=mode)
    function = _function(value, key)
    chosen = string(function, "name", f"{key}.function", required=True)
    if chosen not in names:
        raise BadRequest(
            f"'{key}' names the function {chosen!r}, which is not among 'tools'", param=key
        )
    return pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_FUNCTION, function=chosen)


def tool_calls(value: Any, key: str) -> list[pb.ToolCall]:
    """An assistant message's earlier calls; each one's arguments a JSON object as text."""
    calls = []
    for j, item in enumerate(items(value, key, "tool calls", MAX_TOOL_CALLS)):
        here = f"{key}[{j}]"
        function = _function(item, here, typed=False)
        call = item
        arguments = string(function, "arguments", f"{here}.function", required=True)
        _arguments_object(arguments, f"{here}.function.arguments")
        calls.append(
            pb.ToolCall(
                id=string(call, "id", here, required=True),
                name=string(function, "name", f"{here}.function", required=True),
                arguments=arguments,
            )
        )
    return calls


def _arguments_object(text: str, key: str) -> None:
    try:
        parsed = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise BadRequest(f"'{key}' must be a JSON object as text: {e}", param=key) from None
    if not isinstance(parsed, dict):
        raise BadRequest(f"'{key}' must be a JSON object as text, got {text[:40]!r}", param=key)


# ---- output, sampling ----


def response_format(value: Any, key: str = "response_format") -> pb.OutputConstraint | None:
    """``text`` (no constraint: ``None``), ``json_object``, or ``json_schema`` with a name and
    an object ``schema``."""
    if value is None:
        return None
    given = obj(value, key)
    kind = given.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return pb.OutputConstraint(json_object=True)
    if kind == "json_schema":
        where = f"{key}.json_schema"
        spec = obj(given.get("json_schema"), where)
        name(spec, "name", where)
        string(spec, "description", where)
        boolean(spec, "strict", where)  # the answer always follows the schema
        return pb.OutputConstraint(json_schema=schema_text(spec.get("schema"), f"{where}.schema"))
    raise BadRequest(
        f"'{key}.type' must be 'text', 'json_object' or 'json_schema', got {kind!r}",
        param=f"{key}.type",
    )


def constrain(
    request: pb.GenerateRequest,
    tools: list[pb.Tool],
    choice: pb.ToolChoice | None,
    parallel: bool | None,
    output: pb.OutputConstraint | None,
    output_key: str,
) -> None:
    """Parsed tools, tool choice, parallel calls and output format into ``request``;
    ``output_key`` names the format's field, refused with tools left free to be called."""
    if tools:
        request.tools.extend(tools)
        if choice is not None:
            request.tool_choice.CopyFrom(choice)
        if parallel is not None:
            request.parallel_tool_calls = parallel
    if output is None:
        return
    mode = request.tool_choice.mode
    if tools and mode == pb.TOOL_CHOICE_MODE_AUTO:
        # The answer is text or calls: the neuron cannot hold the text to a format and leave
        # calls free at once.
        raise BadRequest(
            f"'{output_key}' with 'tools' is served only with tool_choice 'none', "
            "'required' or a named function, not 'auto'",
            param=output_key,
        )
    if not tools or mode == pb.TOOL_CHOICE_MODE_NONE:  # forced calls leave no text to format
        request.output.CopyFrom(output)


def logit_bias(value: Any, key: str = "logit_bias") -> dict[int, float]:
    """Token ids (as strings) to biases of -100 to 100."""
    if value is None:
        return {}
    bias = obj(value, key)
    if len(bias) > MAX_LOGIT_BIAS:
        raise BadRequest(f"'{key}' takes at most {MAX_LOGIT_BIAS} tokens", param=key)
    out = {}
    for token, value in bias.items():
        if _TOKEN_ID.fullmatch(token) is None or int(token) >= 1 << 32:
            raise BadRequest(
                f"'{key}' keys must be token ids (non-negative integers as strings), got {token!r}",
                param=key,
            )
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not -100 <= value <= 100  # NaN fails this too
        ):
            raise BadRequest(
                f"'{key}' values must be numbers from -100 to 100, got {value!r} for {token}",
                param=key,
            )
        out[int(token)] = float(value)
    return out


def stop_strings(value: Any, key: str, limit: int) -> list[str]:
    """Stop sequences: a list of at most ``limit`` non-empty strings; [] when not given."""
    stops = items(value, key, "stop sequences", limit)
    if not all(isinstance(s, str) and s for s in stops):
        raise BadRequest(f"'{key}' must be a list of non-empty strings", param=key)
    return stops


def refuse(body: dict[str, Any], unsupported: dict[str, str]) -> None:
    """A 400 naming the first field of ``unsupported`` the body gives (not null), with why."""
    for field, why in unsupported.items():
        if body.get(field) is not None:
            raise BadRequest(f"'{field}' is not supported: {why}", param=field)


# ---- the model, the length, sampling ----


def model(body: dict[str, Any]) -> str:
    """The ``model`` a client names (an id or an alias; the router resolves it)."""
    value = body.get("model")
    if not isinstance(value, str) or not value:
        raise BadRequest("'model' is required: a non-empty string", param="model")
    return value


def max_tokens(body: dict[str, Any], key: str, limit: int) -> int | None:
    """A bound on the answer's tokens: 1 to ``limit`` (``[limits] max_tokens``)."""
    value = integer(body, key)
    if value is None:
        return None
    if value < 1:
        raise BadRequest(f"'{key}' must be at least 1, got {value}", param=key)
    if value > limit:
        raise BadRequest(f"'{key}' must be at most {limit}, got {value}", param=key)
    return value


def sampling(body: dict[str, Any], request: pb.GenerateRequest, hottest: float = 2.0) -> None:
    """``temperature`` (0 to ``hottest``: OpenAI's 2, Anthropic's 1) and ``top_p`` (above 0,
    to 1) into ``request``."""
    temperature = number(body, "temperature", 0.0, hottest)
    if temperature is not None:
        request.temperature = temperature
    top_p = number(body, "top_p", 0.0, 1.0)
    if top_p is not None:
        if top_p == 0:
            raise BadRequest("'top_p' must be greater than 0", param="top_p")
        request.top_p = top_p


# ---- the Responses API's shapes: flat tools, tool choice and format ----


def flat_tools(value: Any, key: str = "tools") -> list[pb.Tool]:
    """Responses' ``tools``: ``{"type": "function", "name", ...}`` each; a hosted tool (web
    search, file search, code interpreter, computer use, MCP, ...) is refused by its type."""
    out: list[pb.Tool] = []
    seen: set[str] = set()
    for i, item in enumerate(items(value, key, "tools", MAX_TOOLS)):
        where = f"{key}[{i}]"
        kind = obj(item, where).get("type")
        if kind != "function":
            raise BadRequest(
                f"'{where}.type': {kind!r} tools are not served (hosted tools run on OpenAI's "
                "service); only 'function' tools, which the client runs",
                param=f"{where}.type",
            )
        out.append(function_tool(item, where, seen))
    return out


def flat_tool_choice(
    value: Any, names: list[str], key: str = "tool_choice"
) -> pb.ToolChoice | None:
    """``auto``, ``none``, ``required`` or ``{"type": "function", "name"}`` naming one of
    ``names``; ``None`` when not given."""
    if value is None or isinstance(value, str):
        return tool_choice(value, names, key)
    kind = obj(value, key).get("type")
    if kind != "function":
        raise BadRequest(
            f"'{key}.type' must be 'function' (the only kind of tool served), got {kind!r}",
            param=f"{key}.type",
        )
    chosen = string(value, "name", key, required=True)
    if chosen not in names:
        raise BadRequest(
            f"'{key}' names the function {chosen!r}, which is not among 'tools'", param=key
        )
    return pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_FUNCTION, function=chosen)


def text_format(value: Any, key: str = "text.format") -> pb.OutputConstraint | None:
    """Responses' ``text.format``: ``response_format``'s kinds, a ``json_schema``'s ``name``,
    ``schema`` (an object), ``description`` and ``strict`` beside its ``type``."""
    if value is None or obj(value, key).get("type") != "json_schema":
        return response_format(value, key)
    name(value, "name", key)
    string(value, "description", key)
    boolean(value, "strict", key)  # the answer always follows the schema
    return pb.OutputConstraint(json_schema=schema_text(value.get("schema"), f"{key}.schema"))


def arguments(body: dict[str, Any], field: str, prefix: str) -> str:
    """A call's arguments: a JSON object as text."""
    text = string(body, field, prefix, required=True)
    _arguments_object(text, at(prefix, field))
    return text
