"""The least a Python gateway making a gRPC call per request can do, for the gateway bench to
compare with: an aiohttp handler that turns an OpenAI chat body into one Generate call over
grpc.aio and answers with its text as JSON. No validation, routing, keys, metrics or error
handling. (cortex sends its requests over one GenerateMany call per neuron instead.)

    .venv/bin/python -m bench.bare_relay --listen 127.0.0.1:18080 --neuron 127.0.0.1:13131

It asks for the answer whole (``message_interval``), as cortex does for non-streaming requests.
"""

from __future__ import annotations

import argparse
import asyncio

import grpc
import uvloop
from aiohttp import web

from helexa.neuron.v1 import neuron_pb2 as pb
from helexa.neuron.v1 import neuron_pb2_grpc as pb_grpc


async def serve(listen: str, neuron: str) -> None:
    channel = grpc.aio.insecure_channel(neuron)
    stub = pb_grpc.NeuronStub(channel)

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        messages = [pb.ChatMessage(role=m["role"], content=m["content"]) for m in body["messages"]]
        generate = pb.GenerateRequest(
            model=body["model"],
            chat=pb.ChatMessages(messages=messages),
            max_tokens=body["max_tokens"],
            message_interval=60.0,
        )
        text = [m.text async for m in stub.Generate(generate, timeout=30)]
        reply = {"role": "assistant", "content": "".join(text)}
        return web.json_response({"object": "chat.completion", "choices": [{"message": reply}]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, port = listen.rsplit(":", 1)
    await web.TCPSite(runner, host, int(port)).start()
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--listen", default="127.0.0.1:18080")
    parser.add_argument("--neuron", default="127.0.0.1:13131")
    args = parser.parse_args()
    uvloop.run(serve(args.listen, args.neuron))


if __name__ == "__main__":
    main()
