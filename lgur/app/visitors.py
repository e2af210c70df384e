"""Who a request comes from, and a fair share of the request queue for each visitor.

Gradio's queue has one limit for everyone: a visitor with many sessions can fill it and
every other visitor is refused ("Queue is full"). `limit_per_visitor` makes the queue refuse
a visitor's request while `per_visitor` of theirs are waiting or running, so the rest of the
queue stays open to others.

A visitor is an address. Behind a reverse proxy (a Hugging Face Space has one) the socket's
peer is the proxy; each trusted proxy appends the address it saw to X-Forwarded-For, so the
visitor is the entry `proxy_hops` from the right, counted across every X-Forwarded-For line
(a proxy may add a line of its own rather than append to the client's). Entries further left
were written by the client itself and are not believed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import fastapi

PER_VISITOR = 2  # requests of one address waiting or running at once


def visitor_address(request: fastapi.Request | None, proxy_hops: int = 0) -> str:
    """The address a request comes from, `proxy_hops` trusted proxies in front of the app."""
    if request is None:
        return "unknown"
    if proxy_hops > 0:
        headers = request.headers  # a proxy may add a line of its own rather than append to the client's
        lines = (
            headers.getlist("x-forwarded-for") if hasattr(headers, "getlist") else [headers.get("x-forwarded-for", "")]
        )
        forwarded = [a.strip() for line in lines for a in line.split(",") if a.strip()]
        if len(forwarded) >= proxy_hops:
            return forwarded[-proxy_hops]
    return request.client.host if request.client else "unknown"


def visitor_limits(environ: dict[str, str]) -> tuple[int, int]:
    """(requests per visitor, trusted proxy hops): LGUR_PER_VISITOR (default PER_VISITOR) and
    LGUR_PROXY_HOPS (default 1 on a Hugging Face Space, which sets SPACE_ID; else 0)."""
    values = []
    for name, default, least in (
        ("LGUR_PER_VISITOR", PER_VISITOR, 1),
        ("LGUR_PROXY_HOPS", int(bool(environ.get("SPACE_ID"))), 0),
    ):
        text = environ.get(name) or str(default)
        try:
            values.append(int(text))
        except ValueError:
            raise SystemExit(f"cannot start: {name} must be a whole number, got {text!r}") from None
        if values[-1] < least:
            raise SystemExit(f"cannot start: {name} must be at least {least}, got {text}")
    return values[0], values[1]


def pending_events(queue: Any) -> Iterator[Any]:
    """Every event waiting in or running from a Gradio queue (gradio.queueing.Queue)."""
    for event_queue in list(queue.event_queue_per_concurrency_id.values()):
        yield from list(event_queue.queue)
    for job in list(queue.active_jobs):
        yield from job or []


def limit_per_visitor(queue: Any, per_visitor: int = PER_VISITOR, proxy_hops: int = 0) -> None:
    """Make a Gradio queue refuse a visitor's request while `per_visitor` of theirs are pending."""
    push = queue.push
    message = f"Too many requests from your address at once (at most {per_visitor}); wait for them to finish."

    async def push_fairly(body: Any, request: fastapi.Request, username: str | None) -> tuple[bool, Any, str]:
        who = visitor_address(request, proxy_hops)
        pending = sum(visitor_address(e.request, proxy_hops) == who for e in pending_events(queue))
        if pending >= per_visitor:
            return False, message, "queue_full"
        return await push(body=body, request=request, username=username)

    queue.push = push_fairly
