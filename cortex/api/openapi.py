"""The API's own OpenAPI 3.1 description, served at ``/openapi.json``.

Written by hand for what cortex really accepts (the fields ``cortex.api.openai``,
``cortex.api.responses`` and ``cortex.api.anthropic`` read; a field cortex does not serve is a
400 naming it, any other field is ignored) and answers; a test keeps its paths equal to the
routes cortex serves.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from cortex import __version__

_REF = "#/components/schemas/"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF + name}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERROR = _json(_ref("Error"), "OpenAI's error envelope")
_RETRY_LATER = {
    **_ERROR,
    "description": "No capacity now (every neuron full or down, or cortex draining)",
    "headers": {
        "Retry-After": {
            "description": "Seconds to wait: measured from how fast the model's queue drains",
            "schema": {"type": "integer", "minimum": 1},
        }
    },
}
_FAILURES = {
    "400": {**_ERROR, "description": "Malformed JSON or a bad field (param names it)"},
    "401": {**_ERROR, "description": "Missing or unknown API key (when keys are configured)"},
    "403": {**_ERROR, "description": "The neurons may not load the model's source"},
    "404": {**_ERROR, "description": "Unknown model"},
    "413": {**_ERROR, "description": "Body larger than [limits] max_body"},
    "502": {**_ERROR, "description": "A neuron failed the request"},
    "503": _RETRY_LATER,
    "504": {**_ERROR, "description": "No token within timeouts.stall"},
}
_STREAM = {
    "description": "With stream: true, server-sent events of chunks, then data: [DONE]; a "
    "failure after the first chunk is an event holding the error envelope",
    "content": {"text/event-stream": {"schema": {"type": "string"}}},
}

_SAMPLING: dict[str, Any] = {
    "model": {"type": "string", "minLength": 1, "description": "A model id or alias"},
    "max_tokens": {
        "type": "integer",
        "minimum": 1,
        "description": "At most [limits] max_tokens; prompt plus max_tokens must fit the "
        "model's context (else 400)",
    },
    "temperature": {"type": "number", "minimum": 0, "maximum": 2, "default": 1},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 1},
    "seed": {"type": "integer"},
    "stop": {
        "oneOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 16},
        ]
    },
    "n": {"type": "integer", "const": 1},
    "user": {"type": "string"},
    "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2, "default": 0},
    "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2, "default": 0},
    "logit_bias": {
        "type": "object",
        "description": "Token ids (as strings) to biases added to their logits",
        "propertyNames": {"pattern": "^[0-9]+$"},
        "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
        "maxProperties": 1024,
    },
    "stream": {"type": "boolean", "default": False},
    "stream_options": {
        "type": "object",
        "properties": {"include_usage": {"type": "boolean", "default": False}},
    },
}
_TEXT_PART = {
    "type": "object",
    "required": ["type", "text"],
    "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
}
_NAME = {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,64}$"}


def _obj(properties: dict[str, Any], *required: str) -> dict[str, Any]:
    return {"type": "object", "required": list(required), "properties": properties}


def _function_of(function: dict[str, Any], **more: Any) -> dict[str, Any]:
    """OpenAI's ``{"type": "function", "function": {...}}`` (tools, tool_choice, calls)."""
    properties = {**more, "type": {"const": "function"}, "function": function}
    return _obj(properties, *more, "type", "function")


_TOOL_CALL = _function_of(
    _obj(
        {
            "name": {"type": "string"},
            "arguments": {"type": "string", "description": "A JSON object, as text"},
        },
        "name",
        "arguments",
    ),
    id={"type": "string"},
)
_TOOLS: dict[str, Any] = {
    "tools": {
        "type": "array",
        "maxItems": 128,
        "items": _function_of(
            _obj(
                {
                    "name": _NAME,
                    "description": {"type": "string"},
                    "parameters": {"type": "object", "description": "A JSON schema"},
                    "strict": {
                        "type": "boolean",
                        "description": "Calls always follow the schema (the neuron "
                        "constrains them)",
                    },
                },
                "name",
            )
        ),
    },
    "tool_choice": {
        "oneOf": [
            {"enum": ["auto", "none", "required"]},
            _function_of(_obj({"name": {"type": "string"}}, "name")),
        ],
        "default": "auto",
    },
    "parallel_tool_calls": {"type": "boolean", "default": True},
    "response_format": {
        "description": "With tools and tool_choice auto, only text (else 400)",
        "oneOf": [
            {
                "type": "object",
                "required": ["type"],
                "properties": {"type": {"enum": ["text", "json_object"]}},
            },
            {
                "type": "object",
                "required": ["type", "json_schema"],
                "properties": {
                    "type": {"const": "json_schema"},
                    "json_schema": {
                        "type": "object",
                        "required": ["name", "schema"],
                        "properties": {
                            "name": _NAME,
                            "description": {"type": "string"},
                            "schema": {"type": "object"},
                            "strict": {"type": "boolean"},
                        },
                    },
                },
            },
        ],
    },
    "logprobs": {"type": "boolean", "default": False},
    "top_logprobs": {
        "type": "integer",
        "minimum": 0,
        "maximum": 20,
        "description": "Needs logprobs: true",
    },
}


_FINISH = {"enum": ["stop", "length", "tool_calls"]}
_CHAT_CHOICE = {
    "type": "object",
    "required": ["index", "message", "finish_reason", "logprobs"],
    "properties": {
        "index": {"type": "integer"},
        "message": {
            "type": "object",
            "required": ["role", "content", "refusal"],
            "properties": {
                "role": {"const": "assistant"},
                "content": {"type": ["string", "null"], "description": "null: only tool calls"},
                "refusal": {"type": "null"},
                "tool_calls": {"type": "array", "items": _TOOL_CALL},
            },
        },
        "finish_reason": _FINISH,
        "logprobs": {
            "description": "With logprobs: true, {content: [{token, logprob, bytes, "
            "top_logprobs}], refusal: null}",
            "type": ["object", "null"],
        },
    },
}
_COMPLETION_CHOICE = {
    "type": "object",
    "required": ["index", "text", "finish_reason", "logprobs"],
    "properties": {
        "index": {"type": "integer"},
        "text": {"type": "string"},
        "finish_reason": _FINISH,
        "logprobs": {
            "description": "With logprobs: N, {tokens, token_logprobs, top_logprobs: "
            "[{token: logprob}], text_offset}",
            "type": ["object", "null"],
        },
    },
}


def _answer(kind: str, choice: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "object": {"const": kind},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {"type": "array", "items": choice},
            "usage": _ref("Usage"),
        },
    }


_TEXT_CONTENT = {
    "oneOf": [
        {"type": "string"},
        {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["type", "text"],
                "properties": {
                    "type": {"enum": ["input_text", "output_text"]},
                    "text": {"type": "string"},
                },
            },
            "description": "Text parts only: input_image, input_file and input_audio are a 400",
        },
    ]
}
_FLAT_FUNCTION = _obj(
    {
        "type": {"const": "function"},
        "name": _NAME,
        "description": {"type": "string"},
        "parameters": {"type": "object", "description": "A JSON schema"},
        "strict": {"type": "boolean", "description": "Calls always follow the schema"},
    },
    "type",
    "name",
)
_CALL_ITEM = {
    "type": "object",
    "required": ["type", "call_id", "name", "arguments"],
    "properties": {
        "type": {"const": "function_call"},
        "id": {"type": "string"},
        "call_id": {"type": "string"},
        "name": {"type": "string"},
        "arguments": {"type": "string", "description": "A JSON object, as text"},
        "status": {"enum": ["in_progress", "completed", "incomplete"]},
    },
}
_RESPONSES: dict[str, Any] = {
    "ResponseRequest": {
        "type": "object",
        "required": ["model", "input"],
        "properties": {
            "model": _SAMPLING["model"],
            "input": {
                "description": "A user message, or items: messages, the function calls of "
                "an earlier answer and their outputs (function_call_output answers a "
                "call_id). Other item types (reasoning, item_reference, hosted tools' "
                "calls) are a 400",
                "oneOf": [
                    {"type": "string", "minLength": 1},
                    {
                        "type": "array",
                        "minItems": 1,
                        "maxItems": 2048,
                        "items": {
                            "oneOf": [
                                {
                                    "type": "object",
                                    "required": ["role", "content"],
                                    "properties": {
                                        "type": {"const": "message"},
                                        "role": {
                                            "enum": ["user", "system", "developer", "assistant"]
                                        },
                                        "content": _TEXT_CONTENT,
                                    },
                                },
                                _CALL_ITEM,
                                {
                                    "type": "object",
                                    "required": ["type", "call_id", "output"],
                                    "properties": {
                                        "type": {"const": "function_call_output"},
                                        "call_id": {"type": "string"},
                                        "output": _TEXT_CONTENT,
                                    },
                                },
                            ]
                        },
                    },
                ],
            },
            "instructions": {"type": "string", "description": "The system message"},
            "previous_response_id": {
                "type": "string",
                "description": "Continue a kept response: its input and output come before "
                "'input' (its instructions do not); unknown or expired: 404",
            },
            "store": {
                "type": "boolean",
                "default": True,
                "description": "Keep the answer for previous_response_id and GET, within "
                "[responses] max_stored, max_age and max_bytes",
            },
            "max_output_tokens": _SAMPLING["max_tokens"],
            "temperature": _SAMPLING["temperature"],
            "top_p": _SAMPLING["top_p"],
            "stream": _SAMPLING["stream"],
            "tools": {
                "type": "array",
                "maxItems": 128,
                "items": _FLAT_FUNCTION,
                "description": "Function tools only: hosted tools (web_search, file_search, "
                "code_interpreter, computer use, mcp, ...) are a 400",
            },
            "tool_choice": {
                "oneOf": [
                    {"enum": ["auto", "none", "required"]},
                    _obj(
                        {"type": {"const": "function"}, "name": {"type": "string"}}, "type", "name"
                    ),
                ],
                "default": "auto",
            },
            "parallel_tool_calls": _TOOLS["parallel_tool_calls"],
            "text": {
                "type": "object",
                "properties": {
                    "format": {
                        "description": "With tools and tool_choice auto, only text (else 400)",
                        "oneOf": [
                            _obj({"type": {"enum": ["text", "json_object"]}}, "type"),
                            _obj(
                                {
                                    "type": {"const": "json_schema"},
                                    "name": _NAME,
                                    "schema": {"type": "object"},
                                    "description": {"type": "string"},
                                    "strict": {"type": "boolean"},
                                },
                                "type",
                                "name",
                                "schema",
                            ),
                        ],
                    }
                },
            },
            "metadata": {
                "type": "object",
                "maxProperties": 16,
                "additionalProperties": {"type": "string", "maxLength": 512},
            },
            "user": {"type": "string"},
            "truncation": {"const": "disabled"},
            "background": {"const": False},
        },
    },
    "Response": {
        "type": "object",
        "required": ["id", "object", "created_at", "status", "model", "output", "usage"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "response"},
            "created_at": {"type": "integer"},
            "completed_at": {"type": ["integer", "null"]},
            "status": {
                "enum": ["completed", "incomplete", "failed"],
                "description": "incomplete: cut by max_output_tokens or the model's context",
            },
            "incomplete_details": {
                "type": ["object", "null"],
                "properties": {"reason": {"const": "max_output_tokens"}},
            },
            "error": {"type": ["object", "null"]},
            "model": {"type": "string"},
            "previous_response_id": {"type": ["string", "null"]},
            "output": {
                "type": "array",
                "items": {
                    "oneOf": [
                        {
                            "type": "object",
                            "required": ["id", "type", "role", "status", "content"],
                            "properties": {
                                "id": {"type": "string"},
                                "type": {"const": "message"},
                                "role": {"const": "assistant"},
                                "status": {"enum": ["completed", "incomplete"]},
                                "content": {
                                    "type": "array",
                                    "items": _obj(
                                        {
                                            "type": {"const": "output_text"},
                                            "text": {"type": "string"},
                                            "annotations": {"type": "array"},
                                        },
                                        "type",
                                        "text",
                                    ),
                                },
                            },
                        },
                        _CALL_ITEM,
                    ]
                },
            },
            "usage": {
                "type": ["object", "null"],
                "properties": {
                    "input_tokens": {"type": "integer"},
                    "output_tokens": {"type": "integer"},
                    "total_tokens": {"type": "integer"},
                    "input_tokens_details": {
                        "type": "object",
                        "properties": {
                            "cached_tokens": {
                                "type": "integer",
                                "description": "Of input_tokens, those the neuron's prefix "
                                "cache held",
                            },
                            "cache_write_tokens": {"type": "integer"},
                        },
                    },
                    "output_tokens_details": {
                        "type": "object",
                        "properties": {"reasoning_tokens": {"const": 0}},
                    },
                },
            },
        },
    },
    "ResponseDeleted": _obj(
        {"id": {"type": "string"}, "object": {"const": "response"}, "deleted": {"const": True}},
        "id",
        "object",
        "deleted",
    ),
}
_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type", "param", "code"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": {"type": ["string", "null"]},
                    "code": {"type": ["string", "null"]},
                },
            }
        },
    },
    "ChatCompletionRequest": {
        "type": "object",
        "required": ["model", "messages"],
        "properties": {
            **_SAMPLING,
            **_TOOLS,
            "max_completion_tokens": _SAMPLING["max_tokens"],
            "modalities": {"type": "array", "const": ["text"]},
            "messages": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["role"],
                    "properties": {
                        "role": {
                            "enum": ["system", "developer", "user", "assistant", "tool"],
                        },
                        "content": {
                            "oneOf": [
                                {"type": "string"},
                                {"type": "array", "items": _TEXT_PART},
                                {"type": "null"},
                            ]
                        },
                        "tool_calls": {
                            "type": "array",
                            "maxItems": 128,
                            "items": _TOOL_CALL,
                            "description": "An assistant message's calls",
                        },
                        "tool_call_id": {
                            "type": "string",
                            "description": "A tool message: the call it answers",
                        },
                    },
                },
            },
        },
    },
    "CompletionRequest": {
        "type": "object",
        "required": ["model", "prompt"],
        "properties": {
            **_SAMPLING,
            "logprobs": {"type": "integer", "minimum": 0, "maximum": 5},
            "prompt": {
                "oneOf": [
                    {"type": "string", "minLength": 1},
                    {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 1},
                ]
            },
        },
    },
    "Usage": {
        "type": "object",
        "properties": {
            "prompt_tokens": {"type": "integer"},
            "completion_tokens": {"type": "integer"},
            "total_tokens": {"type": "integer"},
            "prompt_tokens_details": {
                "type": "object",
                "properties": {
                    "cached_tokens": {
                        "type": "integer",
                        "description": "Of prompt_tokens, those the neuron's prefix cache held",
                    }
                },
            },
        },
    },
    "ChatCompletion": _answer("chat.completion", _CHAT_CHOICE),
    "Completion": _answer("text_completion", _COMPLETION_CHOICE),
    "Model": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "model"},
            "created": {"type": "integer"},
            "owned_by": {"type": "string"},
        },
    },
    "ModelList": {
        "type": "object",
        "properties": {
            "object": {"const": "list"},
            "data": {"type": "array", "items": _ref("Model")},
        },
    },
    "Probe": {"type": "object", "properties": {"status": {"type": "string"}}},
    **_RESPONSES,
}


def _generation(summary: str, request: str, answer: str) -> dict[str, Any]:
    ok = _json(_ref(answer), "The whole answer (stream: false)")
    ok["content"] |= _STREAM["content"]
    return {
        "post": {
            "summary": summary,
            "requestBody": {"required": True, **_json(_ref(request), request)},
            "responses": {"200": ok, **_FAILURES},
        }
    }


def _get(summary: str, schema: str, **others: Any) -> dict[str, Any]:
    return {
        "get": {"summary": summary, "responses": {"200": _json(_ref(schema), summary), **others}}
    }


DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "helexa cortex",
        "version": __version__,
        "description": "OpenAI-compatible gateway to a fleet of helexa neurons, with "
        "Anthropic's Messages API on /v1/messages and the operators' admin API on /admin/v1 "
        "(admin keys only).",
    },
    "paths": {
        "/v1/chat/completions": _generation(
            "Chat completion", "ChatCompletionRequest", "ChatCompletion"
        ),
        "/v1/completions": _generation("Text completion", "CompletionRequest", "Completion"),
        "/v1/responses": _generation(
            "A response (OpenAI's Responses API). With stream: true, server-sent events "
            "(event: TYPE) from response.created to response.completed or "
            "response.incomplete, each with a rising sequence_number; a failure after the "
            "first is an error event, then response.failed",
            "ResponseRequest",
            "Response",
        ),
        "/v1/responses/{response_id}": {
            **_get(
                "A kept response",
                "Response",
                **{"401": _ERROR, "404": {**_ERROR, "description": "Unknown, expired or deleted"}},
            ),
            "delete": {
                "summary": "Forget a kept response",
                "responses": {
                    "200": _json(_ref("ResponseDeleted"), "Deleted"),
                    "401": _ERROR,
                    "404": {**_ERROR, "description": "Unknown, expired or deleted"},
                },
            },
            "parameters": [
                {
                    "name": "response_id",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string"},
                }
            ],
        },
        "/v1/models": _get("Every model cortex serves", "ModelList", **{"401": _ERROR}),
        "/v1/models/{model}": {
            **_get("One model, by id or alias", "Model", **{"401": _ERROR, "404": _ERROR}),
            "parameters": [
                {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
        },
        "/health": _get("The process lives", "Probe"),
        "/ready": _get(
            "At least one neuron up and cortex not draining",
            "Probe",
            **{"503": _json(_ref("Probe"), "Not ready")},
        ),
        "/openapi.json": {
            "get": {
                "summary": "This description",
                "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1")},
            }
        },
    },
    "components": {"schemas": _SCHEMAS},
}


# ---- Anthropic's Messages API (/v1/messages) ----

_A_ERROR = _json(_ref("AnthropicError"), "Anthropic's error envelope")
_A_RETRY_LATER = {
    **_A_ERROR,
    "description": "overloaded_error: no capacity now (every neuron full or down), or cortex "
    "draining, or at limits.max_concurrent",
    "headers": _RETRY_LATER["headers"],
}
_A_FAILURES = {
    "400": {**_A_ERROR, "description": "invalid_request_error: malformed JSON or a bad field "
            "(the message names it)"},
    "401": {**_A_ERROR, "description": "authentication_error: missing or unknown key "
            "(x-api-key or Authorization: Bearer)"},
    "403": {**_A_ERROR, "description": "permission_error: the neurons may not load the model's "
            "source"},
    "404": {**_A_ERROR, "description": "not_found_error: unknown model"},
    "408": {**_A_ERROR, "description": "invalid_request_error: the body did not arrive within "
            "timeouts.body"},
    "413": {**_A_ERROR, "description": "request_too_large: body larger than [limits] max_body"},
    "429": {**_A_ERROR, "description": "rate_limit_error: the key is over its limits",
            "headers": _RETRY_LATER["headers"]},
    "500": {**_A_ERROR, "description": "api_error: a neuron (or cortex) failed the request"},
    "504": {**_A_ERROR, "description": "timeout_error: no token within timeouts.stall"},
    "529": _A_RETRY_LATER,
}  # fmt: skip
_A_TEXT = _obj({"type": {"const": "text"}, "text": {"type": "string"}}, "type", "text")
_A_TOOL_USE = _obj(
    {"type": {"const": "tool_use"}, "id": {"type": "string"}, "name": {"type": "string"},
     "input": {"type": "object"}},
    "type", "id", "name", "input",
)  # fmt: skip
_A_TOOL_RESULT = _obj(
    {
        "type": {"const": "tool_result"},
        "tool_use_id": {"type": "string", "description": "The id of an earlier tool_use block"},
        "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": _A_TEXT}]},
        "is_error": {"type": "boolean"},
    },
    "type",
    "tool_use_id",
)
_A_THINKING = _obj(
    {"type": {"enum": ["thinking", "redacted_thinking"]}},
    "type",
)
_A_CONVERSATION: dict[str, Any] = {
    "model": _SAMPLING["model"],
    "system": {
        "oneOf": [{"type": "string"}, {"type": "array", "items": _A_TEXT}],
        "description": "Text blocks may carry cache_control (accepted; the prefix cache is "
        "automatic)",
    },
    "messages": {
        "type": "array",
        "minItems": 1,
        "maxItems": 2048,
        "description": "The last turn is the user's (an assistant prefill is a 400)",
        "items": _obj(
            {
                "role": {"enum": ["user", "assistant"]},
                "content": {
                    "description": "Text, tool_use (assistant) and tool_result (user) blocks; "
                    "thinking blocks are dropped; image, document and other blocks are a 400",
                    "oneOf": [
                        {"type": "string"},
                        {
                            "type": "array",
                            "items": {"oneOf": [_A_TEXT, _A_TOOL_USE, _A_TOOL_RESULT, _A_THINKING]},
                        },
                    ],
                },
            },
            "role",
            "content",
        ),
    },
    "tools": {
        "type": "array",
        "maxItems": 128,
        "description": "Custom tools only: a server tool (another type) is a 400",
        "items": _obj(
            {
                "type": {"const": "custom"},
                "name": _NAME,
                "description": {"type": "string"},
                "input_schema": {"type": "object", "description": "A JSON schema"},
            },
            "name",
            "input_schema",
        ),
    },
    "tool_choice": _obj(
        {
            "type": {"enum": ["auto", "any", "tool", "none"]},
            "name": {"type": "string", "description": "With type tool: one of tools"},
            "disable_parallel_tool_use": {"type": "boolean", "default": False},
        },
        "type",
    ),
    "output_config": {
        "type": "object",
        "properties": {
            "format": _obj(
                {"type": {"const": "json_schema"}, "schema": {"type": "object"}},
                "type",
                "schema",
            ),
            "effort": {"type": "string", "description": "Accepted without effect"},
        },
        "description": "With tools, format needs tool_choice none, any or tool (else 400)",
    },
    "thinking": {
        "type": "object",
        "properties": {"type": {"enum": ["enabled", "disabled", "adaptive"]}},
        "description": "Accepted without effect: the model does not reason apart",
    },
    "cache_control": {"type": "object", "description": "Accepted without effect"},
    "service_tier": {"type": "string", "description": "Accepted without effect"},
    "speed": {"type": "string", "description": "Accepted without effect"},
}
_A_USAGE = _obj(
    {
        "input_tokens": {"type": "integer", "description": "Prompt tokens the cache did not hold"},
        "cache_read_input_tokens": {
            "type": "integer",
            "description": "Prompt tokens the neuron's prefix cache held",
        },
        "cache_creation_input_tokens": {"type": "integer", "const": 0},
        "output_tokens": {"type": "integer"},
    },
    "input_tokens",
    "output_tokens",
)
_SCHEMAS.update(
    {
        "AnthropicError": _obj(
            {
                "type": {"const": "error"},
                "error": _obj(
                    {
                        "type": {
                            "enum": [
                                "invalid_request_error",
                                "authentication_error",
                                "permission_error",
                                "not_found_error",
                                "request_too_large",
                                "rate_limit_error",
                                "api_error",
                                "timeout_error",
                                "overloaded_error",
                            ]
                        },
                        "message": {"type": "string"},
                    },
                    "type",
                    "message",
                ),
            },
            "type",
            "error",
        ),
        "MessagesRequest": _obj(
            {
                **_A_CONVERSATION,
                "max_tokens": _SAMPLING["max_tokens"],
                "temperature": {"type": "number", "minimum": 0, "maximum": 1, "default": 1},
                "top_p": _SAMPLING["top_p"],
                "top_k": {"type": "integer", "minimum": 0},
                "stop_sequences": {
                    "type": "array",
                    "maxItems": 16,
                    "items": {"type": "string", "minLength": 1},
                },
                "metadata": {"type": "object", "properties": {"user_id": {"type": "string"}}},
                "stream": _SAMPLING["stream"],
            },
            "model",
            "max_tokens",
            "messages",
        ),
        "CountTokensRequest": _obj(_A_CONVERSATION, "model", "messages"),
        "Message": _obj(
            {
                "id": {"type": "string", "pattern": "^msg_"},
                "type": {"const": "message"},
                "role": {"const": "assistant"},
                "model": {"type": "string"},
                "content": {"type": "array", "items": {"oneOf": [_A_TEXT, _A_TOOL_USE]}},
                "stop_reason": {"enum": ["end_turn", "max_tokens", "stop_sequence", "tool_use"]},
                "stop_sequence": {"type": ["string", "null"]},
                "usage": _A_USAGE,
            },
            "id",
            "type",
            "role",
            "model",
            "content",
            "stop_reason",
            "stop_sequence",
            "usage",
        ),
        "MessageTokensCount": _obj({"input_tokens": {"type": "integer"}}, "input_tokens"),
    }
)
_A_STREAM_EVENTS = (
    "With stream: true, Anthropic's events: message_start, then per content block "
    "content_block_start, content_block_delta (text_delta or input_json_delta) and "
    "content_block_stop, then message_delta (stop_reason, usage) and message_stop; ping events "
    "while the request waits (before message_start when no token has come); an error event "
    "when the stream fails after it began"
)
_A_STREAM: dict[str, Any] = {
    "description": _A_STREAM_EVENTS,
    "content": {"text/event-stream": {"schema": {"type": "string"}}},
}
_A_HEADERS = [
    {"name": "x-api-key", "in": "header", "schema": {"type": "string"},
     "description": "The API key (or Authorization: Bearer KEY)"},
    {"name": "anthropic-version", "in": "header", "schema": {"type": "string"},
     "description": "Accepted; every version gets the same answers"},
]  # fmt: skip
_messages_ok = _json(_ref("Message"), f"The whole message (stream: false). {_A_STREAM_EVENTS}")
_messages_ok["content"] |= _A_STREAM["content"]
DOCUMENT["paths"]["/v1/messages"] = {
    "post": {
        "summary": "Anthropic Messages: a message, whole or streamed",
        "parameters": _A_HEADERS,
        "requestBody": {"required": True, **_json(_ref("MessagesRequest"), "MessagesRequest")},
        "responses": {"200": _messages_ok, **_A_FAILURES},
    }
}
DOCUMENT["paths"]["/v1/messages/count_tokens"] = {
    "post": {
        "summary": "The prompt's tokens under the model's template and tokenizer (tools "
        "included), counted by a neuron",
        "parameters": _A_HEADERS,
        "requestBody": {
            "required": True,
            **_json(_ref("CountTokensRequest"), "CountTokensRequest"),
        },
        "responses": {
            "200": _json(_ref("MessageTokensCount"), "The count"),
            **{k: v for k, v in _A_FAILURES.items() if k not in ("504",)},
        },
    }
}


# ---- the admin API (/admin/v1) ----

_ADMIN_FAILURES = {
    "401": {**_ERROR, "description": "No key, or one that is neither an admin nor an API key"},
    "403": {**_ERROR, "description": "An API key (not an admin key), or no admin key configured "
            "(code admin_key_required)"},
    "404": {**_ERROR, "description": "Unknown neuron (code neuron_not_found) or model "
            "(model_not_found)"},
}  # fmt: skip
_ACTION_FAILURES = {
    **_ADMIN_FAILURES,
    "409": {**_ERROR, "description": "Cannot be done as asked (the model does not fit, the "
            "neuron is down, the model is not loaded there, ...): the message says why; nothing "
            "was done"},
    "502": {**_ERROR, "description": "The neuron failed the call"},
    "503": {**_ERROR, "description": "The neuron cannot take it now (draining)"},
}  # fmt: skip
_ADMIN_KEY = [
    {"name": "Authorization", "in": "header", "required": True, "schema": {"type": "string"},
     "description": "Bearer ADMIN_KEY (an [admin] key; or x-api-key: ADMIN_KEY)"},
]  # fmt: skip
_IN_PATH = {"in": "path", "required": True, "schema": {"type": "string"}}
_NEURON_PARAM = {"name": "neuron", **_IN_PATH, "description": "A [[neurons]] name"}
_MODEL_PARAM = {"name": "model", **_IN_PATH, "description": "A catalogue model id or alias"}
_INT = {"type": "integer"}
_STR = {"type": "string"}
_SCHEMAS.update(
    {
        "AdminModel": _obj(
            {
                "id": _STR,
                "state": {"enum": ["LOADING", "READY", "UNLOADING", "FAILED", "UNKNOWN"]},
                "device": _STR,
                "resident_bytes": _INT,
                "in_flight": _INT,
                "waiting": _INT,
                "error": _STR,
                "loaded_at": {"type": "number", "description": "Unix seconds; 0 while loading"},
                "last_used": {"type": "number", "description": "Unix seconds; 0 if never"},
                "load": {
                    "type": ["object", "null"],
                    "description": "While LOADING: stage, unit, done, total, percent",
                },
                "pinned": {"type": "boolean", "description": "In the catalogue or by an admin"},
                "in_catalogue": {"type": "boolean"},
            },
            "id", "state", "device", "resident_bytes", "in_flight", "waiting", "pinned",
        ),
        "AdminNeuron": _obj(
            {
                "name": _STR,
                "endpoint": _STR,
                "status": {"enum": ["unknown", "up", "down", "draining"],
                           "description": "As polled (draining: the neuron's own drain)"},
                "drained": {"type": "boolean", "description": "Drained by an admin in cortex"},
                "error": _STR,
                "host": _STR,
                "version": _STR,
                "in_flight": {**_INT, "description": "This cortex's requests there now"},
                "routing_load": {**_INT, "description": "What routing compares: requests "
                                 "running and waiting there"},
                "polled_at": {"type": "number"},
                "devices": {"type": "array", "items": _obj(
                    {"name": _STR, "description": _STR, "total_bytes": _INT, "free_bytes": _INT},
                    "name", "total_bytes", "free_bytes",
                )},
                "models": {"type": "array", "items": _ref("AdminModel")},
            },
            "name", "endpoint", "status", "drained", "in_flight", "routing_load", "devices",
            "models",
        ),
        "AdminFleet": _obj(
            {
                "neurons": {"type": "array", "items": _ref("AdminNeuron")},
                "up": {**_INT, "description": "Neurons up as polled"},
                "total": _INT,
                "routable": {**_INT, "description": "Up and not drained"},
                "catalogue": {"type": "array", "items": _STR},
            },
            "neurons", "up", "total", "routable", "catalogue",
        ),
        "AdminLoaded": _obj(
            {"neuron": _STR, "model": _ref("AdminModel"), "already_loaded": {"type": "boolean"}},
            "neuron", "model", "already_loaded",
        ),
        "AdminUnloaded": _obj(
            {"neuron": _STR, "model": _STR, "was_loaded": {"type": "boolean"},
             "freed_bytes": _INT},
            "neuron", "model", "was_loaded", "freed_bytes",
        ),
        "AdminPinned": _obj(
            {"neuron": _STR, "model": _STR, "pinned": {"type": "boolean"}},
            "neuron", "model", "pinned",
        ),
        "AdminCatalogue": _obj(
            {"models": {"type": "array", "items": _STR},
             "added": {"type": "array", "items": _STR},
             "removed": {"type": "array", "items": _STR},
             "changed": {"type": "array", "items": _STR,
                         "description": "Kept, with other settings"}},
            "models", "added", "removed", "changed",
        ),
    }
)  # fmt: skip


def _admin(summary: str, answer: str, failures: dict[str, Any]) -> dict[str, Any]:
    return {
        "summary": summary,
        "parameters": _ADMIN_KEY,
        "responses": {"200": _json(_ref(answer), summary), **failures},
    }


DOCUMENT["paths"]["/admin/v1/fleet"] = {
    "get": _admin("The fleet as `cortex status --json` shows it, with each neuron's admin "
                  "drain, its requests from this cortex and its routing load", "AdminFleet",
                  _ADMIN_FAILURES),
}  # fmt: skip
for _action, _summary in (
    ("drain", "Send the neuron no new requests (cortex only; its streams finish, its process "
              "stays up)"),
    ("undrain", "Send the neuron requests again"),
):  # fmt: skip
    DOCUMENT["paths"][f"/admin/v1/neurons/{{neuron}}/{_action}"] = {
        "post": _admin(_summary, "AdminNeuron", _ADMIN_FAILURES),
        "parameters": [_NEURON_PARAM],
    }
for _action, _summary, _reply in (
    ("load", "Load a catalogue model on the neuron (no eviction: 409 when it does not fit; a "
             "load the neuron refuses is undone)", "AdminLoaded"),
    ("unload", "Unload a model from the neuron once its requests there end", "AdminUnloaded"),
    ("pin", "Keep a model READY on the neuron from eviction", "AdminPinned"),
    ("unpin", "Let an admin-pinned model be evicted again", "AdminPinned"),
):  # fmt: skip
    DOCUMENT["paths"][f"/admin/v1/neurons/{{neuron}}/models/{{model}}/{_action}"] = {
        "post": _admin(_summary, _reply, _ACTION_FAILURES),
        "parameters": [_NEURON_PARAM, _MODEL_PARAM],
    }
DOCUMENT["paths"]["/admin/v1/catalogue/reload"] = {
    "post": _admin(
        "Read models.toml again",
        "AdminCatalogue",
        {**_ADMIN_FAILURES, "422": {**_ERROR, "description": "The edited models.toml cannot be "
                                    "used; the catalogue in use stays"}},
    ),
}  # fmt: skip


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(DOCUMENT)
