"""Pause and quiet: the operator's two brakes on delivery (issue 22).

1. **Pause** (`relay pause [--for D] [--reason R]`, `relay resume`, the page's control) holds
   every worker process of the queue: no fetch, no new Pusher call. Calls in flight finish
   and are settled; what a window holds and has not sent goes back to the queue, in order.
   The state is one hash in Redis, so it holds across processes, hosts and restarts; `--for`
   is that key's expiry, so delivery resumes by itself even with no worker running.
2. **Quiet** (SIGTSTP, `relay quiet WORKER_ID`, the page's button) stops one process fetching:
   it sends and settles what its window holds, then hands its channels to a live worker that
   is not quiet (relay.ownership, 6), and stays up holding nothing until it is restarted.
   Quiet is "finish what you took"; pause is "stop sending now, put back what you haven't".
3. **How a worker learns it, with no round trip of its own:**
   - the fetch scripts look first (`gated`): while delivery is paused or this worker is quiet
     they take nothing and say why, so fetching stops the moment the operator asks;
   - the housekeeping round's one script (MAINTAIN, every 0.5 s with work, 1 s idle) returns
     the state as well (`with_state`); while paused the rounds come every 0.5 s, so `resume`
     is seen within that. A paused engine does not fetch at all, so no blocking pop delays it.
   `OperatorGate` keeps what the process learned, logs each change once, sets the gauges
   and wakes the engine; `Controls` reads and writes the state in Redis, for the commands,
   the page and the gate.

Keys for queue `Q` (under Redis Cluster `{Q}:...`, the queue's slot, as relay.queue.Keys
names every key):
- `Q:pause`  hash: reason, who (user@host), since and until (Redis clock; until '' for none);
             with `--for`, it expires at until: delivery resumes by itself
- `Q:quiet`  hash: worker id -> JSON {who, how, since}; the field of a worker no longer
             registered is dropped by the next housekeeping round of any worker
"""

from __future__ import annotations

import getpass
import json
import logging
import re
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from relay.metrics import Metrics
from relay.ownership import HAND_OVER
from relay.redis_shared import NOW_LUA

log = logging.getLogger(__name__)

# While paused, housekeeping comes round this often, so a `resume` is seen within it.
PAUSED_ROUND_S = 0.5
# A state read this much older (Redis clock) than one already applied is a reply that was on
# the wire meanwhile: ignored. Older still, it is taken as a clock change (a failover).
STALE_S = 2.0
REASON_MAX = 500
_DURATION = re.compile(r"\A(\d+(?:\.\d+)?)([smhd]?)\Z")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}

# Redis's clock as text: a Lua number in a reply would be cut to an integer.
_NOW_TEXT = NOW_LUA + "local now_text = string.format('%.6f', now)\n"

# In front of the fetch scripts (relay.queue's FETCH, relay.ownership's TAKE), whose last two
# KEYS are the pause hash and the quiet hash and whose ARGV[2] is the worker id. While
# delivery is paused, or this worker is quiet, they take nothing and say why:
# {'paused', now, the pause's fields} or {'quiet', now, this worker's quiet entry}.
_GATE = """
if redis.call('EXISTS', KEYS[#KEYS - 1]) == 1 then
""" + _NOW_TEXT + """
  return {'paused', now_text, redis.call('HGETALL', KEYS[#KEYS - 1])}
end
do
  local entry = redis.call('HGET', KEYS[#KEYS], ARGV[2])
  if entry then
""" + _NOW_TEXT + """
    return {'quiet', now_text, entry}
  end
end
"""

# After relay.queue's MAINTAIN (run as a function, so its answer can be added to), whose last
# four KEYS are the pause hash, the quiet hash, this worker's held hash (relay.ownership: a
# field per key it owns) and the workers zset, and whose last ARGV is the worker id. Drops
# the quiet entries of workers no longer registered; appends {now, the pause's fields, this
# worker's quiet entry ('' for none), how many keys it owns}.
_STATE = _NOW_TEXT + """
local n = #KEYS
local pause, quiet, held, workers = KEYS[n - 3], KEYS[n - 2], KEYS[n - 1], KEYS[n]
local me = ARGV[#ARGV]
for _, w in ipairs(redis.call('HKEYS', quiet)) do
  if not redis.call('ZSCORE', workers, w) then redis.call('HDEL', quiet, w) end
end
out[#out + 1] = now_text
out[#out + 1] = redis.call('HGETALL', pause)
out[#out + 1] = redis.call('HGET', quiet, me) or ''
out[#out + 1] = redis.call('HLEN', held)
return out
"""

# KEYS: the pause hash. ARGV: reason, who, for (ms; 0: until resumed). A second pause keeps
# `since` and replaces the rest. Returns {now, since, until ('' for none), 1 if it was
# paused already}.
PAUSE = _NOW_TEXT + """
local was = redis.call('HGET', KEYS[1], 'since')
local ms = tonumber(ARGV[3])
local till = ''
if ms > 0 then till = string.format('%.6f', now + ms / 1000) end
redis.call('HSET', KEYS[1], 'reason', ARGV[1], 'who', ARGV[2], 'since', was or now_text,
           'until', till)
if ms > 0 then redis.call('PEXPIRE', KEYS[1], ms) else redis.call('PERSIST', KEYS[1]) end
return {now_text, was or now_text, till, was and 1 or 0}
"""

# KEYS: the pause hash. Ends the pause; returns {now, its fields} (none: it was not paused).
RESUME = _NOW_TEXT + """
local was = redis.call('HGETALL', KEYS[1])
redis.call('DEL', KEYS[1])
return {now_text, was}
"""

# KEYS: workers zset, quiet hash. ARGV: worker id, who, how. Returns 0 when no such worker
# is registered, 1 when it is quiet from now on, 2 when it was quiet already.
QUIET = NOW_LUA + """
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
local entry = cjson.encode({who = ARGV[2], how = ARGV[3], since = now})
if redis.call('HSETNX', KEYS[2], ARGV[1], entry) == 1 then return 1 end
return 2
"""

# A quiet worker's channels to the livest registered worker that is not quiet and keeps
# channels' order (relay.ownership, 6; a 1.0 worker would never send what is parked). KEYS:
# workers zset, queue, owners hash, this worker's in-flight list, quiet hash, info hash. ARGV:
# worker id, push command, key prefix. Only once nothing of it is in flight and it is marked
# quiet (so no fetch of it can take anything any more). Returns the heir, or '' for not yet.
HAND_OFF = NOW_LUA + HAND_OVER + """
local me = ARGV[1]
if redis.call('LLEN', KEYS[4]) > 0 or redis.call('HEXISTS', KEYS[5], me) == 0 then
  return ''
end
local heir = ''
for _, w in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')) do
  if w ~= me and redis.call('HEXISTS', KEYS[5], w) == 0 then
    local ok, info = pcall(cjson.decode, redis.call('HGET', KEYS[6], w) or '')
    if ok and type(info) == 'table' and info.owns_channels == true then heir = w end
  end
end
if heir ~= '' then hand_over(me, heir, {KEYS[4]}, KEYS[2], ARGV[2], KEYS[3], ARGV[3]) end
return heir
"""


def gated(fetch_script: str) -> str:
    """A fetch script that takes nothing while delivery is paused or the worker is quiet."""
    return _GATE + fetch_script


def with_state(maintain_script: str) -> str:
    """The housekeeping round's script, answering the operator's state too."""
    return "local function round()\n" + maintain_script + "\nend\nlocal out = round()\n" + _STATE


# -- the state --------------------------------------------------------------------------------


class PauseError(ValueError):
    """A pause that cannot be: its duration does not parse, or is not positive."""


def duration_s(text: str) -> float:
    """`30s`, `10m`, `2h`, `7d`, or plain seconds."""
    match = _DURATION.match(text.strip().lower())
    if not match:
        raise PauseError(f"not a duration: {text!r} (try 30s, 10m, 2h, 7d)")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def parse_for(text: str | None) -> float | None:
    """A pause's `--for`: seconds, or None for "until resumed" (no text)."""
    if text is None or not text.strip():
        return None
    seconds = duration_s(text)
    if seconds <= 0:
        raise PauseError(f"must be longer than 0: {text!r}")
    return seconds


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text else None
    except ValueError:
        return None


def _pairs(flat: list[Any]) -> dict[str, str]:
    """HGETALL as a script answers it (a flat list), or as redis-py does (a dict)."""
    if isinstance(flat, dict):
        return {_text(k): _text(v) for k, v in flat.items()}
    return {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}


@dataclass(frozen=True)
class Pause:
    reason: str
    who: str  # user@host of whoever paused (or last updated the pause)
    since: float  # Redis clock (Unix time)
    until: float | None  # Redis clock; None: until `relay resume`

    @classmethod
    def from_hash(cls, fields: Any) -> Pause | None:
        found = _pairs(fields)
        if not found:
            return None
        till = _number(found.get("until"))  # a hand-edited hash must not stop a worker
        return cls(found.get("reason", ""), found.get("who", "?"),
                   _number(found.get("since")) or 0.0, till or None)

    def as_dict(self, now: float) -> dict[str, Any]:
        """For `stats --json`, the page and /healthz."""
        return {**asdict(self), "for_s": round(now - self.since, 1),
                "left_s": round(max(0.0, self.until - now), 1) if self.until else None}


@dataclass(frozen=True)
class Quiet:
    who: str
    how: str  # "SIGTSTP", "relay quiet", "page"
    since: float

    @classmethod
    def from_json(cls, raw: Any) -> Quiet | None:
        if not raw:
            return None
        try:
            data = json.loads(raw)
            return cls(str(data.get("who", "?")), str(data.get("how", "?")),
                       float(data.get("since") or 0))
        except (ValueError, TypeError, AttributeError):
            return cls("?", "?", 0.0)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Seen:
    """The operator's state as one script saw it, at `at` (Redis clock)."""

    at: float
    pause: Pause | None
    quiet: Quiet | None  # None from a fetch refused for a pause: it did not look
    owned: int | None = None  # keys this worker owns; None: not looked at (a fetch)


def refusal(reply: Any) -> Seen | None:
    """What a gated fetch refused for, or None: it fetched (or found the worker reaped)."""
    if not (isinstance(reply, list) and len(reply) == 3 and isinstance(reply[0], bytes)):
        return None
    kind, at, fields = reply
    if kind == b"paused":
        return Seen(float(at), Pause.from_hash(fields), None)
    return Seen(float(at), None, Quiet.from_json(fields))


def round_state(tail: list[Any]) -> Seen:
    """What `with_state` appended to the round's answer."""
    at, pause, quiet, owned = tail
    return Seen(float(at), Pause.from_hash(pause), Quiet.from_json(quiet), int(owned))


def who_am_i() -> str:
    """user@host, for the pause's `who` (a container may have no name for its uid)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "?"
    return f"{user}@{socket.gethostname()}"


# -- what operators read ----------------------------------------------------------------------


def when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def span(seconds: float) -> str:
    """Seconds as an operator reads them: 850 ms, 12 s, 4 min, 3.0 h, 2.0 d."""
    seconds = max(0.0, seconds)
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def describe(pause: Pause, now: float) -> str:
    """'by ops@web1 since ... (2 min ago), until ... (in 8 min): pusher incident'."""
    if pause.until is None:
        till = "until `relay resume`"
    elif pause.until > now:
        till = f"until {when(pause.until)} (in {span(pause.until - now)})"
    else:
        till = f"until {when(pause.until)}"
    return (f"by {pause.who} since {when(pause.since)} ({span(now - pause.since)} ago), "
            f"{till}: {pause.reason or '(no reason given)'}")


def describe_quiet(quiet: Quiet, now: float) -> str:
    return f"quiet since {when(quiet.since)} ({span(now - quiet.since)} ago; {quiet.how}, " \
           f"by {quiet.who})"


# -- in Redis ---------------------------------------------------------------------------------


class Controls:
    """The pause and the quiet marks of one queue in Redis: for the commands, the page and
    the worker's OperatorGate. `keys` is the queue's relay.queue.Keys."""

    def __init__(self, client: Any, keys: Any) -> None:
        self.client = client
        self.keys = keys
        self._pause = client.register_script(PAUSE)
        self._resume = client.register_script(RESUME)
        self._quiet = client.register_script(QUIET)
        self._hand_off = client.register_script(HAND_OFF)

    def pause(self, reason: str, who: str, for_s: float | None = None
              ) -> tuple[Pause, bool, float]:
        """Pause (or update the pause): (the pause now, whether it was paused already, Redis
        time)."""
        ms = 0 if for_s is None else max(1, round(for_s * 1000))
        now, since, till, was = self._pause(keys=[self.keys.pause],
                                            args=[reason[:REASON_MAX], who, ms])
        pause = Pause(reason[:REASON_MAX], who, float(since), float(till) if till else None)
        return pause, bool(was), float(now)

    def resume(self) -> tuple[Pause | None, float]:
        """End the pause: (what it was, None if there was none; Redis time)."""
        now, was = self._resume(keys=[self.keys.pause])
        return Pause.from_hash(was), float(now)

    def read(self) -> Pause | None:
        return Pause.from_hash(self.client.hgetall(self.keys.pause))

    def quiet(self, worker_id: str, who: str, how: str) -> int:
        """Mark a registered worker quiet: 0 no such worker, 1 done, 2 it was already."""
        return int(self._quiet(keys=[self.keys.workers, self.keys.quiet],
                               args=[worker_id, who, how]))

    def quiet_workers(self) -> dict[str, Quiet]:
        found = {}
        for wid, raw in self.client.hgetall(self.keys.quiet).items():
            quiet = Quiet.from_json(raw)
            if quiet is not None:
                found[_text(wid)] = quiet
        return found

    def hand_off(self, worker_id: str, inflight_key: str, push_cmd: str) -> str:
        """A quiet worker's channels to another worker; the heir, or '' (not yet)."""
        keys = [self.keys.workers, self.keys.queue, self.keys.owners, inflight_key,
                self.keys.quiet, self.keys.info]
        heir = self._hand_off(keys=keys, args=[worker_id, push_cmd, self.keys.prefix])
        return _text(heir or b"")


# -- in the worker ----------------------------------------------------------------------------


class OperatorGate:
    """What the operator asked of this worker process, as far as it has learned.

    The engine reads `holding` (delivery paused: start no call, keep nothing waiting in the
    window) and `may_fetch`. Learned from the scripts' answers (`observe`, given to
    relay.queue), or from SIGTSTP (`go_quiet`); the housekeeper calls `after_round`."""

    def __init__(self, worker_id: str = "", controls: Controls | None = None,
                 metrics: Metrics | None = None, inflight_key: str = "",
                 push_cmd: str = "LPUSH", held: Callable[[], int] = lambda: 0) -> None:
        self.worker_id = worker_id
        self.controls = controls
        self.metrics = metrics
        self.inflight_key = inflight_key
        self.push_cmd = push_cmd
        self.held = held  # notifications the window holds
        self.on_change: Callable[[], None] = lambda: None  # wakes the engine
        self.pause: Pause | None = None
        self.quiet: Quiet | None = None  # once quiet, quiet until restarted
        self.quiet_in_redis = False  # marked in Redis: no fetch of this worker takes anything
        self.owned = 0  # keys this worker owns, as of the last round
        self.drained = False  # quiet, nothing held, nothing owned: said once
        self.at = 0.0  # Redis time of the newest state applied

    @property
    def holding(self) -> bool:
        return self.pause is not None

    @property
    def may_fetch(self) -> bool:
        return self.pause is None and self.quiet is None

    def state(self) -> str:
        return "paused" if self.pause else ("quiet" if self.quiet else "delivering")

    def observe(self, seen: Seen) -> None:
        """A script's view of the state; an older view than one applied already is ignored."""
        if 0 < self.at - seen.at < STALE_S:
            return
        self.at = seen.at
        changed = self._learn_pause(seen.pause, seen.at)
        if seen.quiet is not None:
            changed = self._learn_quiet(seen.quiet) or changed
            self.quiet_in_redis = True
        elif seen.owned is not None:  # a round: it looked, and this worker is not marked
            self.quiet_in_redis = False
        if seen.owned is not None:
            self.owned = seen.owned
        self._gauges()
        if changed:
            self.on_change()

    def go_quiet(self, quiet: Quiet) -> bool:
        """Quiet by a signal; True when it was not quiet before."""
        changed = self._learn_quiet(quiet)
        self._gauges()
        if changed:
            self.on_change()
        return changed

    def publish_quiet(self) -> None:
        """Mark this worker quiet in Redis, so its fetch scripts take nothing (and `stats`
        and the page show it). Raises Redis errors: the next round tries again."""
        if self.quiet is None or self.controls is None or self.quiet_in_redis:
            return
        if self.controls.quiet(self.worker_id, self.quiet.who, self.quiet.how):
            self.quiet_in_redis = True

    def after_round(self, wait_s: float) -> float:
        """After a housekeeping round: a quiet worker hands its channels on once its window
        is empty; the wait until the next round, shorter while paused."""
        if self.quiet is not None:
            self._quiet_round()
        return min(wait_s, PAUSED_ROUND_S) if self.pause is not None else wait_s

    def facts(self, now: float) -> dict[str, Any]:
        """For /healthz: paused and quiet are healthy states, said in the body."""
        return {"delivery": self.state(),
                "pause": self.pause.as_dict(now) if self.pause else None,
                "quiet": self.quiet.as_dict() if self.quiet else None}

    # -- inside ---------------------------------------------------------------------------------

    def _learn_pause(self, pause: Pause | None, now: float) -> bool:
        old, self.pause = self.pause, pause
        if old is None and pause is not None:
            log.warning("delivery paused %s; calls in flight finish, nothing new is sent and "
                        "what was not sent goes back to the queue", describe(pause, now))
        elif old is not None and pause is None:
            ran_out = old.until is not None and now >= old.until - 0.5
            log.info("delivery resumed (%s) after %s; it had been paused %s",
                     "its --for ran out" if ran_out else "relay resume",
                     span(now - old.since), describe(old, now))
        elif old != pause and pause is not None:
            log.info("pause updated: now %s", describe(pause, now))
        return (old is None) != (pause is None)

    def _learn_quiet(self, quiet: Quiet) -> bool:
        if self.quiet is not None:
            return False
        self.quiet = quiet
        log.warning("quiet (%s, by %s): fetching stops; the %d notification(s) this process "
                    "holds are sent and settled, then its channels pass to another worker; "
                    "it stays up, holding nothing, until restarted", quiet.how, quiet.who,
                    self.held())
        return True

    def _quiet_round(self) -> None:
        if not self.quiet_in_redis:
            self.publish_quiet()
            return
        if self.owned and self.controls is not None:
            heir = self.controls.hand_off(self.worker_id, self.inflight_key, self.push_cmd)
            if heir:
                log.info("quiet: its %d channel(s) passed to worker %s", self.owned, heir)
                self.owned = 0
        if not self.drained and self.owned == 0 and self.held() == 0:
            self.drained = True
            log.info("quiet: nothing in flight and no channel owned; it may be restarted now")

    def _gauges(self) -> None:
        if self.metrics is None:
            return
        self.metrics.paused.set(1 if self.pause else 0)
        self.metrics.paused_since.set(self.pause.since if self.pause else 0)
        self.metrics.quiet.set(1 if self.quiet else 0)
