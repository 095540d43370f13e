"""What the page shows, read from Redis; and the dead-letter actions it may take.

1. `Board.overview()`: the queue now (length, trend and ETA, the delivery rate of the last
   10 s, retries and the next due, dead letters), every registered worker (from its
   heartbeat info: busy greenlets, in flight, gates) and the shared rate limit's use; two
   pipelined round trips (three more with several Pusher apps: a line per app).
2. `Board.dead_page()`: a filtered page of dead letters, each with a stable id (a hash of its
   exact bytes), so an action names exactly the entry the operator saw.
3. `Board.requeue()` / `Board.purge()`: through DeadLetters.requeue / purge, which
   remove each entry by its exact bytes: two operators at once never move one twice. The
   filtered requeue skips `invalid` dead letters unless the filter names that class.
4. `Board.pause()` / `resume()` / `quiet()`: the operator's brakes (relay.pause), as the
   commands `pause`, `resume` and `quiet` apply them; the overview shows the pause and
   which workers are quiet.

No secret is ever part of an answer: only queue names, counts, and what workers publish.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from relay.admin import collect_apps
from relay.deadletters import DeadLetters, is_invalid
from relay.history import recent_rates
from relay.pause import Controls, Pause, Quiet, describe
from relay.queue import RedisQueue, split_totals

log = logging.getLogger(__name__)

DEAD_SCAN_MAX = 10000  # dead letters read per page or action; the page says when it stopped
HEAD_CHARS = 160
TREND_SPAN_S = 10.0  # the trend compares with the newest queue-length sample this old...
TREND_MIN_SPAN_S = 1.0  # ...or, on a page just opened, the oldest at least this old
# Older samples are dropped: a page opened after a quiet hour must not compare with the length
# of an hour ago ("growing 0.3/s" while the queue grew 39/s; issue 21, stumble 4).
TREND_KEEP_S = 30.0
ERROR_CLASSES = ("invalid", "rejected", "exhausted")


@dataclass(frozen=True)
class DeadFilter:
    """Which dead letters an operator means: a reason class and/or text in payload or error."""

    text: str = ""
    error_class: str = ""

    def matches(self, entry: dict[str, Any]) -> bool:
        if self.error_class and entry.get("error_class") != self.error_class:
            return False
        if not self.text:
            return True
        needle = self.text.lower()
        return needle in str(entry.get("payload", "")).lower() or \
            needle in str(entry.get("error", "")).lower()


def entry_id(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()[:20]


def parse_entry(raw: bytes) -> dict[str, Any]:
    try:
        entry = json.loads(raw)
    except ValueError:
        return {"payload": raw.decode("utf-8", errors="replace"), "error": "not relay's JSON"}
    return entry if isinstance(entry, dict) else {"payload": str(entry), "error": "?"}


def _num(value: Any, default: float = 0.0) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


class Trend:
    """growing / draining / steady / empty from the queue's length over the last seconds.

    Redis keeps no length history (producers RPUSH without counting), so the dashboard
    process samples the length at each overview, on Redis's clock, and keeps TREND_KEEP_S of
    them. Until a sample TREND_MIN_SPAN_S old exists (a page just opened), it says
    "measuring" rather than compare with something stale."""

    def __init__(self) -> None:
        self._samples: deque[tuple[float, int]] = deque(maxlen=256)

    def _reference(self, now: float) -> tuple[float, int] | None:
        while self._samples and (now - self._samples[0][0] > TREND_KEEP_S
                                 or self._samples[0][0] > now):  # old, or a clock step back
            self._samples.popleft()
        aged = [s for s in self._samples if now - s[0] >= TREND_MIN_SPAN_S]
        spanned = [s for s in aged if now - s[0] >= TREND_SPAN_S]
        return spanned[-1] if spanned else (aged[0] if aged else None)

    def observe(self, now: float, length: int, outflow: float) -> dict[str, Any]:
        """The trend as of `now` (Redis's clock); `outflow` (per second) gives an ETA while
        the length does not change."""
        ref = self._reference(now)
        self._samples.append((now, length))
        change = None if ref is None else (length - ref[1]) / (now - ref[0])
        eta = None
        if length == 0:
            state = "empty"
        elif change is None:
            state = "measuring"
        elif change < 0:
            state, eta = "draining", length / -change
        elif change > 0:
            state = "growing"
        else:  # no change over the span: the outflow alone gives an estimate
            state, eta = "steady", (length / outflow if outflow > 0 else None)
        return {"state": state,
                "change_per_s": round(change, 2) if change is not None else None,
                "eta_s": round(eta, 1) if eta is not None else None}


class Board:
    """The dashboard's view of one queue; keeps a few queue-length samples for the trend."""

    def __init__(self, queue: RedisQueue) -> None:
        self.queue = queue
        self.keys = queue.keys
        self.dead = DeadLetters(queue.client, queue.keys)
        self.controls = Controls(queue.client, queue.keys)
        self.trend = Trend()

    # -- overview ------------------------------------------------------------------------------

    def overview(self) -> dict[str, Any]:
        k, client = self.keys, self.queue.client
        now = self.queue.now()  # Redis's clock, on the queue's node
        pipe = client.pipeline(transaction=False)
        pipe.llen(k.queue)
        pipe.zcard(k.retry)
        pipe.zrange(k.retry, 0, 0, withscores=True)
        pipe.llen(k.dead)
        pipe.zrange(k.workers, 0, -1, withscores=True)
        pipe.hgetall(k.info)
        pipe.get(k.ratelimit)
        pipe.hgetall(k.stats)
        pipe.hgetall(k.pause)
        pipe.hgetall(k.quiet)
        length, retry, first_due, dead, beats, infos, tat, stats, paused, quiet = pipe.execute()
        rates = recent_rates(client, k, now)
        outflow = sum(rates.values())
        workers = [self._worker(wid.decode(), deadline, infos.get(wid), now, quiet.get(wid))
                   for wid, deadline in beats]
        pause = Pause.from_hash(paused)
        # a line per Pusher app when several are configured (as `relay stats` has it)
        totals, per_app = split_totals(stats)
        app_lines = collect_apps(self.queue, now, per_app, infos)
        return {
            "queue": k.queue, "now": now,
            "pause": {**pause.as_dict(now), "text": describe(pause, now)} if pause else None,
            "length": int(length), "trend": self.trend.observe(now, int(length), outflow),
            "outflow_per_s": round(outflow, 2),
            "delivered_per_s": round(rates["delivered"], 2),  # over the last 10 full seconds
            "retry": {"scheduled": int(retry),
                      "next_due_in_s": round(first_due[0][1] - now, 1) if first_due else None},
            "dead": int(dead),
            "inflight": sum(w["inflight"] for w in workers),
            "workers": workers,
            "gates": self._gates(workers, tat, now),
            "totals": totals,
            "apps": sorted(app_lines) if app_lines else [],  # the page's chart filter
            "app_lines": app_lines,
        }

    def _worker(self, wid: str, deadline: float, raw: bytes | None, now: float,
                quiet_raw: bytes | None = None) -> dict[str, Any]:
        try:
            info = json.loads(raw) if raw else {}
        except ValueError:
            info = {}
        ttl = _num(info.get("ttl"), 10.0)
        age = now - (deadline - ttl)
        return {
            "id": wid, "host": info.get("host"), "pid": info.get("pid"),
            "started_at": info.get("started_at"), "heartbeat_age_s": round(age, 1),
            # Heartbeats come every ttl/4: two missed ones make it late, the deadline dead.
            "late": age > ttl / 2, "expired": deadline < now,
            # greenlets in the pool; before 1.1 a worker said so as its slot count
            "pool": int(_num(info.get("pool", info.get("slots")))),
            "busy": int(_num(info.get("busy"))),
            "inflight": int(_num(info.get("inflight"))),
            "circuit": info.get("circuit") or {"open": False},
            "circuits": info.get("circuits") or None,  # every app's, when several
            "paused_for_s": _num(info.get("paused_for_s")),
            "rate_limit": info.get("rate_limit") or {},
            "shedding": info.get("shedding") or {},
            # the process's own word (delivering, paused, quiet), and its quiet mark if any
            "delivery": info.get("delivery") or "delivering",
            "quiet": quiet.as_dict() if (quiet := Quiet.from_json(quiet_raw)) else None,
        }

    @staticmethod
    def _gates(workers: list[dict[str, Any]], tat: bytes | None, now: float) -> dict[str, Any]:
        """The gates in front of Pusher, over every live worker."""
        live = [w for w in workers if not w["expired"]]
        opened = [{"worker": w["id"], "reason": c.get("reason"),
                   "next_probe_in_s": c.get("next_probe_in_s"),
                   "app": c.get("app") if w["circuits"] else None}  # named with several apps
                  for w in live for c in (w["circuits"] or [w["circuit"]])
                  if isinstance(c, dict) and c.get("open")]
        paused = max((w["paused_for_s"] for w in live), default=0.0)
        rate = max((_num(w["rate_limit"].get("per_s")) for w in live), default=0.0)
        burst = max((_num(w["rate_limit"].get("burst")) for w in live), default=0.0)
        ahead = max(0.0, _num(tat) - now) if tat else 0.0
        shedding = {policy: any(w["shedding"].get(policy, {}).get("active") for w in live)
                    for policy in ("backlog", "max_age")}
        return {"circuit": {"open": bool(opened), "open_in": opened},
                "paused_for_s": round(paused, 1),
                "rate_limit": {"per_s": rate, "burst": burst,
                               "in_use": round(min(burst, ahead * rate), 1) if rate else 0.0},
                "shedding": shedding}

    # -- pause, resume, quiet --------------------------------------------------------------------

    def pause(self, reason: str, for_s: float | None, who: str) -> dict[str, Any]:
        pause, was, now = self.controls.pause(reason, who, for_s)
        log.info("dashboard: %s %s", "pause updated" if was else "delivery paused",
                 describe(pause, now))
        return {"paused": pause.as_dict(now), "updated": was, "text": describe(pause, now)}

    def resume(self, who: str) -> dict[str, Any]:
        was, now = self.controls.resume()
        if was is not None:
            log.info("dashboard: delivery resumed by %s; it had been paused %s", who,
                     describe(was, now))
        return {"resumed": was is not None}

    def quiet(self, worker_id: str, who: str) -> dict[str, Any]:
        done = self.controls.quiet(worker_id, who, "page")
        if done == 1:
            log.info("dashboard: worker %s told to go quiet by %s", worker_id, who)
        return {"quiet": done > 0, "already": done == 2, "registered": done > 0}

    # -- dead letters ---------------------------------------------------------------------------

    def _dead_scan(self, start: int = 0, stop: int = DEAD_SCAN_MAX - 1
                   ) -> tuple[list[bytes], int]:
        pipe = self.queue.client.pipeline(transaction=False)
        pipe.lrange(self.keys.dead, start, stop)
        pipe.llen(self.keys.dead)
        raws, total = pipe.execute()
        return list(raws), int(total)

    def dead_page(self, wanted: DeadFilter, offset: int, limit: int) -> dict[str, Any]:
        if not wanted.text and not wanted.error_class:  # unfiltered: read just the page
            raws, total = self._dead_scan(offset, offset + limit - 1)
            rows = [(raw, parse_entry(raw)) for raw in raws]
            matched, scanned = total, total
        else:
            raws, total = self._dead_scan()
            rows = [(raw, entry) for raw in raws if wanted.matches(entry := parse_entry(raw))]
            matched, scanned = len(rows), len(raws)
            rows = rows[offset:offset + limit]
        now = time.time()
        page = []
        for raw, entry in rows:
            payload = str(entry.get("payload", ""))
            failed_at = _num(entry.get("failed_at"), now)
            page.append({"id": entry_id(raw), "error_class": entry.get("error_class"),
                         "error": str(entry.get("error", "")), "attempts": entry.get("attempts"),
                         "failed_at": failed_at, "age_s": round(now - failed_at, 1),
                         "head": payload[:HEAD_CHARS], "size": len(payload)})
        return {"total": total, "matched": matched, "offset": offset, "limit": limit,
                "scanned": scanned, "entries": page}

    def dead_entry(self, ident: str) -> dict[str, Any] | None:
        for raw in self._dead_scan()[0]:
            if entry_id(raw) == ident:
                return {"id": ident, **parse_entry(raw)}
        return None

    def requeue_one(self, ident: str) -> int:
        chosen = [raw for raw in self._dead_scan()[0] if entry_id(raw) == ident][:1]
        return self.dead.requeue(chosen)

    def requeue(self, wanted: DeadFilter) -> dict[str, int]:
        """Requeue the filtered; `invalid` ones only when the filter names that class, since
        the worker sends them straight back (as `dead requeue` without --include-invalid)."""
        chosen = [raw for raw in self._dead_scan()[0] if wanted.matches(parse_entry(raw))]
        skipped = set() if wanted.error_class == "invalid" else {
            raw for raw in chosen if is_invalid(raw)}
        moved = self.dead.requeue([raw for raw in chosen if raw not in skipped])
        log.info("dashboard: requeued %d dead letter(s) (filter %s), skipped %d invalid",
                 moved, wanted, len(skipped))
        return {"moved": moved, "skipped_invalid": len(skipped)}

    def purge(self, wanted: DeadFilter, older_than_s: float) -> int:
        cutoff = time.time() - older_than_s
        chosen = []
        for raw in self._dead_scan()[0]:
            entry = parse_entry(raw)
            if wanted.matches(entry) and _num(entry.get("failed_at")) < cutoff:
                chosen.append(raw)
        purged = self.dead.purge(chosen)
        log.info("dashboard: purged %d dead letter(s) older than %.0f s", purged, older_than_s)
        return purged
