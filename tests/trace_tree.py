"""A Jaeger-style text rendering of received spans (tests/otlp_receiver.py): one tree per
trace, children under their parent, each line with its start offset and duration, kind,
service and a few telling attributes, and each link under the span that holds it.

    trace f77baf60… (2 spans, 1 service)
         +0.0 ms     4.6 ms  shop: POST /orders [INTERNAL]
         +0.0 ms     1.0 ms  └─ shop: notify [INTERNAL]
    trace 46d167af… (4 spans, 1 service)
        +10.6 ms     3.4 ms  relay: process notifications [CONSUMER] relay.attempt=1 ...
                                • relay.retry relay.reason=HTTP 503: busy relay.attempts=1 ...
                                ↳ link to shop: notify in trace f77baf60…
        +10.7 ms     3.1 ms  ├─ relay: POST /apps/{app_id}/events [CLIENT] ... ERROR
        +14.2 ms     3.2 ms  └─ relay: process notifications [CONSUMER] relay.attempt=2 ...
                                   ↳ link to shop: notify in trace f77baf60…
        +14.2 ms     3.1 ms     └─ relay: POST /apps/{app_id}/events [CLIENT] ...=200

What the README shows comes from here: `python -m tests.trace_tree FILE` renders spans saved
with `dump` (one JSON object a line).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tests.otlp_receiver import Event, Link, Span

SHOWN = ("messaging.batch.message_count", "relay.attempt", "relay.channels",
         "relay.message.age_seconds", "http.response.status_code", "error.type")


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, list):
        return "[" + ",".join(_value(v) for v in value) + "]"
    return str(value)


def _line(span: Span, origin: int, depth: int, last: bool) -> str:
    offset = (span.start_ns - origin) / 1e6
    prefix = "" if depth == 0 else "   " * (depth - 1) + ("└─ " if last else "├─ ")
    service = span.resource.get("service.name", "?")
    shown = " ".join(f"{k}={_value(span.attributes[k])}" for k in SHOWN
                     if k in span.attributes)
    status = "" if span.status_code != "ERROR" else (
        f" ERROR: {span.status_message}" if span.status_message else " ERROR")
    return (f"{offset:+9.1f} ms {span.duration_s * 1e3:7.1f} ms  {prefix}{service}: "
            f"{span.name} [{span.kind}] {shown}{status}").rstrip()


def _extras(span: Span, depth: int, known: dict[str, Span]) -> list[str]:
    """The span's events, and its links named by the span they point at when it arrived."""
    pad = " " * 28 + "   " * depth
    lines = []
    for event in span.events:
        attrs = " ".join(f"{k}={_value(v)}" for k, v in event.attributes.items())
        lines.append(f"{pad}• {event.name} {attrs}".rstrip())
    for link in span.links:
        target = known.get(link.span_id)
        what = (f"{target.resource.get('service.name', '?')}: {target.name}" if target
                else f"span {link.span_id[:8]}… (not received)")
        attrs = " ".join(f"{k}={_value(v)}" for k, v in link.attributes.items())
        lines.append(f"{pad}↳ link to {what} in trace {link.trace_id[:8]}… {attrs}".rstrip())
    return lines


def _count(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


def _tree(members: Sequence[Span], origin: int, known: dict[str, Span]) -> list[str]:
    """One trace's lines: roots (and spans whose parent did not arrive) first."""
    ids = {s.span_id for s in members}
    children: dict[str | None, list[Span]] = defaultdict(list)
    for span in members:
        children[span.parent_span_id if span.parent_span_id in ids else None].append(span)
    out: list[str] = []

    def walk(span: Span, depth: int, last: bool) -> None:
        out.append(_line(span, origin, depth, last))
        if depth == 0 and span.parent_span_id and span.parent_span_id not in ids:
            out.append(" " * 28 + f"(parent {span.parent_span_id[:8]}… not received)")
        out.extend(_extras(span, depth, known))
        kids = sorted(children[span.span_id], key=lambda kid: kid.start_ns)
        for i, kid in enumerate(kids):
            walk(kid, depth + 1, i == len(kids) - 1)

    for root in sorted(children[None], key=lambda r: r.start_ns):
        walk(root, 0, True)
    return out


def render(spans: Sequence[Span]) -> str:
    """The spans as text trees, traces in the order they started."""
    by_trace: dict[str, list[Span]] = defaultdict(list)
    for span in spans:
        by_trace[span.trace_id].append(span)
    origin = min((s.start_ns for s in spans), default=0)
    out: list[str] = []
    for trace_id, members in sorted(by_trace.items(),
                                    key=lambda kv: min(s.start_ns for s in kv[1])):
        services = {s.resource.get("service.name") for s in members}
        out.append(f"trace {trace_id[:8]}… ({_count(len(members), 'span')}, "
                   f"{_count(len(services), 'service')})")
        out.extend(_tree(members, origin, {s.span_id: s for s in spans}))
    return "\n".join(out)


def dump(spans: Iterable[Span], path: Path) -> None:
    """Save spans, one JSON object a line, for `render` later (the README's example)."""
    with path.open("w") as f:
        for span in spans:
            f.write(json.dumps(asdict(span)) + "\n")


def load(path: Path) -> list[Span]:
    spans = []
    for line in path.read_text().splitlines():
        obj = json.loads(line)
        obj["events"] = tuple(Event(**e) for e in obj["events"])
        obj["links"] = tuple(Link(**lk) for lk in obj["links"])
        spans.append(Span(**obj))
    return spans


if __name__ == "__main__":
    sys.stdout.write(render(load(Path(sys.argv[1]))) + "\n")
