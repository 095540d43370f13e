"""Admin subcommands of `python worker.py`: look at the queue and fix the usual problems.

1. `stats [--json] [--watch]`: queue, in-flight per worker (with heartbeat age), retries,
   dead letters, running totals and the rate-limit state; with several Pusher apps
   (RELAY_APPS), a line per app (its totals, circuit and rate limit; `apps` in the JSON).
2. `dead list [--limit N]`, `dead requeue (--all | --match TEXT) [--include-invalid]`,
   `dead purge [--older-than DURATION]`: each entry is moved or removed by its exact bytes
   in one Redis step, so two operators at once never lose or double one. `invalid` dead
   letters are not requeued unless asked: the worker would refuse them again at once.
3. `enqueue CHANNEL JSON [--event NAME]`: a test notification through the producer helper.
4. `dashboard`: the operator's page (relay/dashboard/), until SIGTERM or SIGINT.
5. `check`: one-shot health for scripts and container health checks: the /healthz of every
   live worker of the queue, at the metrics address each one publishes (relay/check.py).
6. `pause [--for DURATION] [--reason TEXT]`, `resume`: delivery held, or going again, for
   every worker process of the queue; `quiet WORKER_ID`: one process stops fetching, finishes
   what it holds, stays up (relay/pause.py).

Exit codes: 0 done or healthy; 1 unhealthy, Redis failed, or a requeue/purge/quiet moved
nothing (nothing matched); 2 bad configuration or usage, or a pause, resume or quiet that
Redis did not carry out (unreachable): the operator must know it did not happen.
Output goes to stdout (it is the command's result); logs stay on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, TextIO

import redis

from relay import check, explain, producer, redis_url
from relay.config import Config
from relay.deadletters import DeadLetters, is_invalid
from relay.message import InvalidMessage
from relay.pause import (
    Controls,
    Pause,
    PauseError,
    describe,
    duration_s,
    parse_for,
    span,
    who_am_i,
)
from relay.queue import RedisQueue, split_totals

EXIT_OK, EXIT_UNHEALTHY, EXIT_USAGE = 0, 1, 2
EXIT_NOTHING = EXIT_UNHEALTHY  # requeue or purge moved nothing: nothing matched
REQUEUE_USAGE = "%(prog)s (--all | --match TEXT) [--include-invalid] [setting flags]"
CONTROL = ("pause", "resume", "quiet")  # commands whose Redis failure is exit 2
WATCH_EVERY_S = 2.0


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
    _add_control(sub, parents)


def _add_control(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    pause = sub.add_parser(
        "pause", parents=parents, usage="%(prog)s [--for DURATION] [--reason TEXT] "
        "[setting flags]", help="hold delivery on every worker process of the queue",
        description="Within a second every worker process of the queue stops fetching and "
                    "starts no Pusher call; calls in flight finish and are settled, what was "
                    "taken and not sent goes back to the queue, and the queue grows safely. "
                    "Kept in Redis: it holds across hosts and restarts. Pausing again while "
                    "paused updates the reason and the deadline.")
    pause.add_argument("--for", dest="duration", metavar="DURATION",
                       help="resume by itself after this long, e.g. 30s, 10m, 2h (Redis ends "
                            "the pause even with no worker running); default: until `resume`")
    pause.add_argument("--reason", metavar="TEXT", default="",
                       help="why: shown in the workers' logs, `stats` and the page")
    sub.add_parser("resume", parents=parents, usage="%(prog)s [setting flags]",
                   help="end a pause: every worker process delivers again within a second")
    quiet = sub.add_parser(
        "quiet", parents=parents, usage="%(prog)s WORKER_ID [setting flags]",
        help="one worker process stops fetching, finishes what it holds, stays up",
        description="Before a deploy: the process stops fetching, sends and settles what it "
                    "holds, passes its channels to another worker and stays up until it is "
                    "restarted (SIGTSTP does the same). `stats` shows it quiet with 0 in "
                    "flight once it may be restarted.")
    quiet.add_argument("worker_id", metavar="WORKER_ID",
                       help="as `stats` lists it (host:pid:tag), or a unique start of it")


def usage_problem(args: argparse.Namespace) -> str | None:
    """A usage mistake argparse cannot say in one line, or None: `dead requeue` naming no
    dead letters would otherwise print the whole usage before the one line that matters."""
    if getattr(args, "verb", None) == "requeue" and not (args.all or args.match):
        return ("dead requeue: say which dead letters: --all, or --match TEXT "
                "(nothing was moved)")
    if getattr(args, "command", None) == "pause":
        try:
            parse_for(args.duration)
        except PauseError as exc:
            return f"pause --for: {exc} (nothing was paused)"
    return None


def redis_failure_status(command: str) -> int:
    """The exit status of a command Redis failed: 2 for a pause, resume or quiet, which did
    not happen; 1 otherwise."""
    return EXIT_USAGE if command in CONTROL else EXIT_UNHEALTHY


def parse_duration(text: str) -> float:
    """30s, 10m, 12h, 7d: one grammar with the pause's --for (relay.pause.duration_s)."""
    try:
        return duration_s(text)
    except PauseError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run(command: str, args: argparse.Namespace, cfg: Config, client: redis.Redis,
        out: TextIO = sys.stdout) -> int:
    queue = RedisQueue(client, cfg.queue, cfg.order, worker_id="admin")
    handlers = {"stats": _stats, "dead": _dead, "enqueue": _enqueue, "check": _check,
                "dashboard": _dashboard, "pause": _pause, "resume": _resume, "quiet": _quiet}
    try:
        return handlers[command](args, cfg, queue, out)
    except redis.RedisError as exc:
        undone = " (nothing was changed)" if command in CONTROL else ""
        out.write(f"{command} failed: {explain.redis_error(exc, redis_url.mask(cfg.redis_url))}"
                  f"{undone}\n")
        return redis_failure_status(command)


# -- stats -------------------------------------------------------------------------------------


def collect_stats(cfg: Config, queue: RedisQueue) -> dict[str, Any]:
    lengths = queue.lengths()
    now = queue.now()
    tat = queue.client.get(queue.keys.ratelimit)
    totals, per_app = split_totals(queue.client.hgetall(queue.keys.stats))
    ahead = max(0.0, float(tat) - now) if tat else 0.0
    workers = queue.workers()
    controls = Controls(queue.client, queue.keys)
    pause, quiet = controls.read(), controls.quiet_workers()
    for w in workers:
        w["quiet"] = quiet[w["id"]].as_dict() if w["id"] in quiet else None
    return {
        "paused": pause.as_dict(now) if pause else None,
        "now": now,
        "queue": cfg.queue,
        "length": lengths["queue"],
        "inflight": sum(w["inflight"] for w in workers),
        "retry_scheduled": lengths["retry"],
        "dead": lengths["dead"],
        "workers": workers,
        "totals": totals,
        "rate_limit": {"limit_per_s": cfg.rate_limit, "burst": cfg.rate_burst,
                       "budget_used_events": round(ahead * cfg.rate_limit, 1)},
        "apps": collect_apps(queue, now, per_app),
    }


def collect_apps(queue: RedisQueue, now: float, totals: dict[str, dict[str, int]],
                 infos: dict[bytes, Any] | None = None) -> dict[str, Any] | None:
    """Each Pusher app's totals, circuit and rate limit when several are configured
    (RELAY_APPS), else None. Read from Redis alone, so it needs no RELAY_APPS here: the totals
    the settle scripts keep per app, and what the live workers publish in their heartbeat
    (each app's circuit and rate limit). `totals`: the per-app totals (`split_totals`); `infos`:
    the info hash, when the caller has read it already."""
    if infos is None:
        infos = queue.client.hgetall(queue.keys.info)
    circuits: dict[str, list[dict[str, Any]]] = {}
    limits: dict[str, dict[str, float]] = {}
    for wid, raw in infos.items():
        info = _entry(raw)
        for circuit in info.get("circuits") or ():
            if isinstance(circuit, dict) and circuit.get("app"):
                circuits.setdefault(str(circuit["app"]), []).append(
                    {"worker": wid.decode(), "open": bool(circuit.get("open")),
                     "reason": circuit.get("reason")})
        for name, limit in (info.get("rate_limits") or {}).items():
            if isinstance(limit, dict):
                limits[str(name)] = limit
    names = sorted({*totals, *circuits, *limits})
    if len(names) < 2:
        return None
    keys = {n: queue.keys.ratelimit_of(n) for n in names}
    tats = dict(zip(names, queue.client.mget([keys[n] for n in names]), strict=True))
    apps: dict[str, Any] = {}
    for name in names:
        limit = limits.get(name) or {}
        per_s = float(limit.get("per_s") or 0)
        ahead = max(0.0, float(tats[name]) - now) if tats[name] else 0.0
        opened = [c for c in circuits.get(name, ()) if c["open"]]
        apps[name] = {
            "totals": totals.get(name, {}),
            "circuit": {"open_in": [c["worker"] for c in opened],
                        "reason": opened[0]["reason"] if opened else None},
            "rate_limit": {"limit_per_s": per_s, "burst": int(limit.get("burst") or 0),
                           "budget_used_events": round(ahead * per_s, 1)}}
    return apps


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
    if s.get("paused"):
        p = s["paused"]
        lines.append("DELIVERY PAUSED " + describe(
            Pause(p["reason"], p["who"], p["since"], p["until"]), s["now"]))
    for w in s["workers"]:
        state = "EXPIRED" if w["expired"] else "alive"
        quiet = w.get("quiet")
        if quiet:
            state += f"; QUIET since {span(s['now'] - quiet['since'])} ago ({quiet['how']}, " \
                     f"by {quiet['who']})" + (": may be restarted" if not w["inflight"] else "")
        lines.append(f"  worker {w['id']}: {w['inflight']} in flight, heartbeat "
                     f"{w['heartbeat_age_s']:.1f} s ago ({state})")
    if not s["workers"]:
        lines.append("  no worker registered")
    totals = ", ".join(f"{k} {v:,}" for k, v in sorted(s["totals"].items())) or "none yet"
    lines.append(f"totals: {totals}")
    rl = s["rate_limit"]
    if rl["limit_per_s"] and not s.get("apps"):
        lines.append(f"rate limit {rl['limit_per_s']:g}/s burst {rl['burst']}: "
                     f"{rl['budget_used_events']:g} of the burst in use")
    for name, app in (s.get("apps") or {}).items():
        lines.append(format_app(name, app))
    return "\n".join(lines) + "\n"


def format_app(name: str, app: dict[str, Any]) -> str:
    """One app's line: its totals, its circuit, its rate limit."""
    totals = ", ".join(f"{k} {v:,}" for k, v in sorted(app["totals"].items())) or "none yet"
    circuit = app["circuit"]
    if circuit["open_in"]:
        state = (f"circuit OPEN in {len(circuit['open_in'])} worker(s): "
                 f"{circuit['reason'] or '?'}")
    else:
        state = "circuit closed"
    rl = app["rate_limit"]
    limit = (f"rate limit {rl['limit_per_s']:g}/s burst {rl['burst']}: "
             f"{rl['budget_used_events']:g} of the burst in use" if rl["limit_per_s"]
             else "no rate limit")
    return f"  app {name}: {totals}; {state}; {limit}"


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


# -- pause, resume, quiet -----------------------------------------------------------------------


def _pause(args: argparse.Namespace, cfg: Config, queue: RedisQueue, out: TextIO) -> int:
    pause, was, now = Controls(queue.client, queue.keys).pause(
        args.reason, who_am_i(), parse_for(args.duration))
    out.write(f"{'pause updated' if was else 'delivery paused'} on queue {cfg.queue} "
              f"{describe(pause, now)}\n"
              "every worker process holds within a second (calls in flight finish); "
              "`relay resume` ends it\n")
    return EXIT_OK


def _resume(args: argparse.Namespace, cfg: Config, queue: RedisQueue, out: TextIO) -> int:
    was, now = Controls(queue.client, queue.keys).resume()
    if was is None:
        out.write(f"delivery on queue {cfg.queue} was not paused; nothing to do\n")
    else:
        out.write(f"delivery resumed on queue {cfg.queue} after {span(now - was.since)}; it "
                  f"had been paused {describe(was, now)}\n")
    return EXIT_OK


def _quiet(args: argparse.Namespace, cfg: Config, queue: RedisQueue, out: TextIO) -> int:
    ids = [w.decode() for w in queue.client.zrange(queue.keys.workers, 0, -1)]
    wanted = args.worker_id
    found = [w for w in ids if w == wanted] or [w for w in ids if w.startswith(wanted)]
    if len(found) != 1:
        which = "several registered workers start with" if found else "no registered worker is"
        out.write(f"quiet: {which} {wanted!r} (`relay stats` lists them); nothing was "
                  "changed\n")
        return EXIT_NOTHING
    done = Controls(queue.client, queue.keys).quiet(found[0], who_am_i(), "relay quiet")
    if not done:
        out.write(f"quiet: worker {found[0]} is no longer registered; nothing was changed\n")
        return EXIT_NOTHING
    out.write(f"worker {found[0]} {'was quiet already' if done == 2 else 'goes quiet'}: it "
              "stops fetching within a second, sends and settles what it holds, passes its "
              "channels on and stays up; `relay stats` says when it may be restarted\n")
    return EXIT_OK


def _dashboard(args: argparse.Namespace, cfg: Config, queue: RedisQueue, out: TextIO) -> int:
    from relay import dashboard  # its app imports parse_duration from here

    return dashboard.serve(cfg, queue)
