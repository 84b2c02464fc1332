"""The API's own OpenAPI 3.1 description, served at ``/openapi.json``.

Written by hand for what cortex really accepts (the fields ``cortex.api.openai`` reads; any
other field is ignored) and answers; a test keeps its paths equal to the routes cortex serves.
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


def _answer(kind: str) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "object": {"const": kind},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {"type": "array", "items": {"type": "object"}},
            "usage": _ref("Usage"),
        },
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
            "max_completion_tokens": _SAMPLING["max_tokens"],
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
        },
    },
    "ChatCompletion": _answer("chat.completion"),
    "Completion": _answer("text_completion"),
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
        "description": "OpenAI-compatible gateway to a fleet of helexa neurons.",
    },
    "paths": {
        "/v1/chat/completions": _generation(
            "Chat completion", "ChatCompletionRequest", "ChatCompletion"
        ),
        "/v1/completions": _generation("Text completion", "CompletionRequest", "Completion"),
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


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(DOCUMENT)
