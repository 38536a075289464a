"""The floor the gateway is measured against: bare Starlette -> NATS request/reply, nothing else.

    python bench/skeleton_gateway.py --nats-url URL --node-id bench-node --model bench-tiny

One route, ``POST /v1/chat/completions``: the body decoded into the same request type, one
``InferenceRequest`` sent to the node's own subject with ``nc.request``, the reply decoded and
answered as JSON. No validation beyond decoding, no model lookup, no dispatch, no history: what
any Starlette-on-NATS service pays per request. Prints ``READY {"port": N}`` once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nats  # noqa: E402
import uvicorn  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import Response  # noqa: E402
from starlette.routing import Route  # noqa: E402

from events import codec, subjects  # noqa: E402
from events.messages import InferenceRequest  # noqa: E402
from events.openai import ChatCompletionBody  # noqa: E402


async def main(args: argparse.Namespace) -> None:
    nc = await nats.connect(args.nats_url)
    subject = subjects.infer_on_node(subjects.CHAT, args.model, args.node_id)

    async def chat(request: Request) -> Response:
        body = codec.decode(await request.body(), ChatCompletionBody)
        message = InferenceRequest(request_id=uuid.uuid4().hex, model=body.model, capability=subjects.CHAT, params=body)
        reply = codec.decode_reply((await nc.request(subject, codec.encode(message), timeout=30)).data)
        return Response(
            codec.encode({"choices": [{"message": {"content": reply.text}}]}), media_type="application/json"
        )

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    print("READY " + json.dumps({"port": sock.getsockname()[1]}), flush=True)
    await task


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--nats-url", required=True)
    parser.add_argument("--node-id", default="bench-node")
    parser.add_argument("--model", default="bench-tiny")
    import uvloop

    uvloop.run(main(parser.parse_args()))
