"""The ceiling: a bare Starlette endpoint that parses the same JSON body and returns a fixed reply.

Served with the same uvicorn settings as the real server, it measures what the HTTP stack alone costs.
"""

from __future__ import annotations

import json

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

REPLY = json.dumps(
    {
        "success": True,
        "event_id": "00000000-0000-0000-0000-000000000000",
        "message": "Agent event 'agent.started' emitted successfully",
        "timestamp": "2026-01-01T00:00:00.000000+00:00",
        "position": 1,
        "aggregate_id": "url-cacher-abc123",
        "aggregate_version": 1,
    }
).encode()


async def emit(request: Request) -> Response:
    json.loads(await request.body())
    return Response(REPLY, media_type="application/json")


app = Starlette(routes=[Route("/events/emit/agent", emit, methods=["POST"])])
