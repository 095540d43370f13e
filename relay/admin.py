"""Admin subcommands of `python worker.py`: look at the queue and fix the usual problems.

1. `stats [--json] [--watch]`: queue, in-flight per worker (with heartbeat age), retries,
   dead letters, running totals and the rate-limit state.
2. `dead list [--limit N]`, `dead requeue (--all | --match TEXT) [--include-invalid]`,
   `dead purge [--older-than DURATION]`: each entry is moved or removed by its exact bytes
   in one Redis step, so two operators at once never lose or double one. `invalid` dead
   letters are not requeued unless asked: the worker would refuse them again at once.
3. `enqueue CHANNEL JSON [--event NAME]`: a test notification through the producer helper.
4. `dashboard`: the operator's page (relay/dashboard/), until SIGTERM or SIGINT.
5. `check`: one-shot health for scripts and container health checks: the /healthz of every
   live worker of the queue, at the metrics address each one publishes (relay/check.py).

Exit codes: 0 done or healthy; 1 unhealthy, Redis failed, or a requeue/purge moved nothing
(nothing matched); 2 bad configuration or usage.
Output goes to stdout (it is the command's result); logs stay on stderr.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from typing import Any, TextIO

import redis

from relay import check, explain, producer, redis_url
from relay.config import Config
from relay.deadletters import DeadLetters, is_invalid
from relay.message import InvalidMessage
from relay.queue import RedisQueue

EXIT_OK, EXIT_UNHEALTHY, EXIT_USAGE = 0, 1, 2
EXIT_NOTHING = EXIT_UNHEALTHY  # requeue or purge moved nothing: nothing matched
REQUEUE_USAGE = "%(prog)s (--all | --match TEXT) [--include-invalid] [setting flags]"
WATCH_EVERY_S = 2.0
_DURATION = re.compile(r"\A(\d+(?:\.\d+)?)([smhd]?)\Z")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def add_subcommands(sub: Any, parents: list[argparse.ArgumentParser],
                    parents_without_event: list[argparse.ArgumentParser]) -> None:
    """Register the admin subcommands on the CLI's subparsers."""
    stats = sub.add_parser("stats", parents=parents, help="queue, in-flight, retries, dead")
    stats.add_argument("--json", action="store_true", help="one JSON object, for machines")
    stats.add_argument("--watch", action="store_true", help="refresh in place every 2 s")
    dead = sub.add_parser("dead", parents=parents, help="list, requeue or purge dead letters",
                          usage="%(prog)s {list,requeue,purge} ... [setting flags]")
    verbs = dead.add_subparsers(dest="verb", required=True, prog=dead.prog)
    lst = verbs.add_parser("list", parents=parents, help="show dead letters, oldest first",
                           usage="%(prog)s [--limit N] [setting flags]")
    lst.add_argument("--limit", type=int, default=20)
    # Without a short usage, argparse prints every setting flag (30 lines) before its error.
    req = verbs.add_parser("requeue", parents=parents, help="put dead letters back in the queue",
                           usage=REQUEUE_USAGE)
    which = req.add_mutually_exclusive_group()  # "neither" is said in one line: usage_problem
    which.add_argument("--all", action="store_true")
    which.add_argument("--match", metavar="TEXT", help="only entries whose payload or error "
                                                       "contains TEXT")
    req.add_argument("--include-invalid", action="store_true",
                     help="requeue `invalid` ones too (skipped otherwise: the worker refuses "
                          "them again at once, unless what it accepts has changed)")
    purge = verbs.add_parser("purge", parents=parents, help="delete dead letters",
                             usage="%(prog)s [--older-than DURATION] [setting flags]")
    purge.add_argument("--older-than", metavar="DURATION", type=parse_duration,
                       help="e.g. 30m, 12h, 7d (default: all)")
    enq = sub.add_parser("enqueue", parents=parents_without_event,
                         help="push a test notification")
    enq.add_argument("channel")
    enq.add_argument("data", help="JSON object or value")
    enq.add_argument("--event", help="event name (default: the worker's RELAY_EVENT)")
    sub.add_parser("check", parents=parents,
                   help="every live worker's /healthz: exit 0 all healthy, 1 not")
    sub.add_parser("dashboard", parents=parents,
                   help="serve the operator's page at RELAY_DASHBOARD_ADDR")


def usage_problem(args: argparse.Namespace) -> str | None:
    """A usage mistake argparse cannot say in one line, or None: `dead requeue` naming no
    dead letters would otherwise print the whole usage before the one line that matters."""
    if getattr(args, "verb", None) == "requeue" and not (args.all or args.match):
        return ("dead requeue: say which dead letters: --all, or --match TEXT "
                "(nothing was moved)")
    return None


def parse_duration(text: str) -> float:
    match = _DURATION.match(text.strip().lower())
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (try 30s, 10m, 12h, 7d)")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def run(command: str, args: argparse.Namespace, cfg: Config, client: redis.Redis,
        out: TextIO = sys.stdout) -> int:
    queue = RedisQueue(client, cfg.queue, cfg.order, worker_id="admin")
    handlers = {"stats": _stats, "dead": _dead, "enqueue": _enqueue, "check": _check,
                "dashboard": _dashboard}
    try:
        return handlers[command](args, cfg, queue, out)
    except redis.RedisError as exc:
        out.write(f"{command} failed: {explain.redis_error(exc, redis_url.mask(cfg.redis_url))}\n")
        return EXIT_UNHEALTHY


# -- stats -------------------------------------------------------------------------------------


def collect_stats(cfg: Config, queue: RedisQueue) -> dict[str, Any]:
    lengths = queue.lengths()
    now = queue.now()
    tat = queue.client.get(queue.keys.ratelimit)
    ahead = max(0.0, float(tat) - now) if tat else 0.0
    workers = queue.workers()
    return {
        "queue": cfg.queue,
        "length": lengths["queue"],
        "inflight": sum(w["inflight"] for w in workers),
        "retry_scheduled": lengths["retry"],
        "dead": lengths["dead"],
        "workers": workers,
        "totals": queue.totals(),
        "rate_limit": {"limit_per_s": cfg.rate_limit, "burst": cfg.rate_burst,
                       "budget_used_events": round(ahead * cfg.rate_limit, 1)},
    }


def _stats(args: argparse.Namespace, cfg: Config, queue: RedisQueue, out: TextIO) -> int:
    try:
        while True:
            report = collect_stats(cfg, queue)
            if args.json:
                out.write(json.dumps(report) + "\n")
            else:
                if args.watch:
                    out.write("\x1b[H\x1b[2J")  # home and clear: refresh in place
                out.write(format_stats(report))
            out.flush()
            if not args.watch:
                return EXIT_OK
            time.sleep(WATCH_EVERY_S)
    except KeyboardInterrupt:  # Ctrl-C is how --watch ends
        return EXIT_OK


def format_stats(s: dict[str, Any]) -> str:
    lines = [
        f"queue {s['queue']}: {s['length']:,} waiting, {s['inflight']:,} in flight, "
        f"{s['retry_scheduled']:,} scheduled for retry, {s['dead']:,} dead",
    ]
    for w in s["workers"]:
        state = "EXPIRED" if w["expired"] else "alive"
        lines.append(f"  worker {w['id']}: {w['inflight']} in flight, heartbeat "
                     f"{w['heartbeat_age_s']:.1f} s ago ({state})")
    if not s["workers"]:
        lines.append("  no worker registered")
    totals = ", ".join(f"{k} {v:,}" for k, v in sorted(s["totals"].items())) or "none yet"
    lines.append(f"totals: {totals}")
    rl = s["rate_limit"]
    if rl["limit_per_s"]:
        lines.append(f"rate limit {rl['limit_per_s']:g}/s burst {rl['burst']}: "
                     f"{rl['budget_used_events']:g} of the burst in use")
    return "\n".join(lines) + "\n"


# -- dead letters --------------------------------------------------------------------------------


def _dead(args: argparse.Namespace, cfg: Config, queue: RedisQueue, out: TextIO) -> int:
    if args.verb == "list":
        return _dead_list(queue, args.limit, out)
    dead = DeadLetters(queue.client, queue.keys)
    entries = dead.entries()
    if args.verb == "requeue":
        return _requeue(args, cfg, dead, entries, out)
    cutoff = time.time() - args.older_than if args.older_than is not None else None
    chosen = [e for e in entries if cutoff is None or _failed_at(e) < cutoff]
    n = dead.purge(chosen)
    out.write(f"purged {n} dead letter(s)\n")
    return EXIT_OK if n else EXIT_NOTHING


def _requeue(args: argparse.Namespace, cfg: Config, dead: DeadLetters, entries: list[bytes],
             out: TextIO) -> int:
    """Requeue what matches; `invalid` ones only when asked, since the worker would send
    them straight back to the dead letters."""
    chosen = [e for e in entries if args.all or _matches(e, args.match)]
    invalid = [] if args.include_invalid else [e for e in chosen if is_invalid(e)]
    skipped = set(invalid)
    n = dead.requeue([e for e in chosen if e not in skipped])
    out.write(f"requeued {n} dead letter(s) to {cfg.queue}\n")
    if invalid:
        example = _entry(invalid[0]).get("error", "?")
        out.write(f"skipped {len(invalid)} invalid dead letter(s) (e.g. {example!r}): the "
                  "worker would dead-letter them again at once; once it accepts them (e.g. a "
                  "higher RELAY_MAX_DATA_BYTES, or PUSHER_ENCRYPTION_MASTER_KEY_BASE64 set), "
                  "add --include-invalid\n")
    return EXIT_OK if n else EXIT_NOTHING


def _dead_list(queue: RedisQueue, limit: int, out: TextIO) -> int:
    now = time.time()
    dead = DeadLetters(queue.client, queue.keys)
    entries = dead.entries(limit)
    for raw in entries:
        entry = _entry(raw)
        age = now - float(entry.get("failed_at") or now)
        out.write(f"{age:8.0f}s ago  attempts={entry.get('attempts', '?')}  "
                  f"{entry.get('error', '?')}\n          payload: "
                  f"{str(entry.get('payload', raw))[:100]}\n")
    total = dead.count()
    out.write(f"{len(entries)} of {total} dead letter(s) shown\n")
    return EXIT_OK


def _entry(raw: bytes) -> dict[str, Any]:
    try:
        entry = json.loads(raw)
    except ValueError:
        return {}
    return entry if isinstance(entry, dict) else {}


def _failed_at(raw: bytes) -> float:
    try:
        return float(_entry(raw).get("failed_at") or 0)
    except (TypeError, ValueError):
        return 0.0


def _matches(raw: bytes, text: str) -> bool:
    entry = _entry(raw)
    return text in str(entry.get("payload", "")) or text in str(entry.get("error", ""))


# -- enqueue and check ---------------------------------------------------------------------------


def _enqueue(args: argparse.Namespace, cfg: Config, queue: RedisQueue, out: TextIO) -> int:
    try:
        data = json.loads(args.data)
    except ValueError:
        out.write("DATA must be JSON, e.g. '{\"title\": \"hello\"}'\n")
        return EXIT_USAGE
    try:
        text = producer.notify(args.channel, data, event=args.event, client=queue.client,
                               queue=cfg.queue, max_data_bytes=cfg.max_data_bytes)
    except InvalidMessage as exc:
        out.write(f"not enqueued: {exc}\n")
        return EXIT_USAGE
    out.write(f"enqueued to {cfg.queue}: {text}\n")
    return EXIT_OK


def _check(args: argparse.Namespace, cfg: Config, queue: RedisQueue, out: TextIO) -> int:
    return check.run(cfg, queue, out)


def _dashboard(args: argparse.Namespace, cfg: Config, queue: RedisQueue, out: TextIO) -> int:
    from relay import dashboard  # its app imports parse_duration from here

    return dashboard.serve(cfg, queue)
