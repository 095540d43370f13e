"""Reliable fetch, ack, retry, dead-letter and recovery on Redis: every key and script.

Keys for queue `Q` (all start with `Q`). Under Redis Cluster every key but the queue itself
starts with `{Q}` instead (unless Q already holds a hash tag), which hashes exactly like `Q`:
every key is in the queue's slot, so every script below (each declares all its keys) is legal
there. Redis time is read inside scripts, never by a bare TIME that a cluster client would
send to an arbitrary node.

- `Q`                      list: producers RPUSH; the worker pops the head (fifo) or tail (lifo)
- `Q:inflight:<wid>:0`     list: what worker process wid has taken and not yet settled (its
                           window). Before 1.1 a process had one list per greenlet slot,
                           `...:<n>`; such lists are still reaped (see `worker_slots`)
- `Q:workers`              zset: worker id -> heartbeat deadline (Redis clock, seconds)
- `Q:workers:info`         hash: worker id -> JSON {host, pid, slots, ttl, started_at}
- `Q:workers:reaped`       zset: worker id -> when it was reaped (swept for an hour after)
- `Q:retry`                zset: retry wrapper -> due time (Redis clock); moved back when due
- `Q:dead`                 list: dead letters, JSON {payload, error, failed_at, attempts, ...}
- `Q:stats`                hash: running totals (delivered, dead, retried, shed_*) for `stats`
- `Q:ratelimit`            string: the shared rate limiter's state (see ratelimit.py)
- `Q:history:s:<sec>`      hash: counts settled in that second (Redis clock), 16 min TTL
- `Q:history:m:<min>`      hash: the same per minute, 25 h TTL (see history.py, _TALLY)
- `Q:probe`                any: used for an instant at start by `probe` (ACL rights check)
- `Q:pause`, `Q:quiet`     hashes: delivery paused, workers told to go quiet (relay.pause); the
                           fetch scripts and MAINTAIN read them, so learning costs no round trip

How nothing is lost:
1. Fetch moves items atomically into the process's in-flight list (BLMOVE, or a script that
   moves up to a window's room). After a command whose reply may have been lost, the window
   reads the whole list once (`inflight_items`) and adopts what it did not know, so nothing
   moved by a lost reply is stranded (relay.window).
2. Settling a call is one script (SETTLE): for each notification it removes the exact bytes
   that were fetched and, in the same script, puts them where they go next (nowhere, the
   retry set, the dead list, back to the queue); it only pushes when the removal happened,
   so a script replayed after a lost reply does nothing twice.
3. A live worker keeps its heartbeat in `Q:workers`; any worker returns the in-flight lists
   of a worker whose deadline passed to the queue, in one script that also unregisters it,
   so two reapers cannot both return the same items. For an hour after, its lists are swept
   again, in case it was only frozen and pops once more before it registers anew.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from secrets import token_hex
from typing import Any

import redis

from relay.errors import RelayError
from relay.ownership import HAND_OVER, LANE_KEYS, RETURN_LANES, SETTLE_OWNED, TAKE
from relay.pause import Seen, gated, refusal, round_state, with_state
from relay.redis_shared import NOW_LUA
from relay.rules import DEFAULT_APP

log = logging.getLogger(__name__)

# Redis time, inside scripts, so that hosts with skewed clocks agree on deadlines.
_NOW = NOW_LUA

# KEYS: queue, workers zset, this process's in-flight list. ARGV: pop side, worker id, the
# most to move. Moves up to that many from the queue to the in-flight list and returns
# {the items moved, in order; the queue's length after}; or false when this worker has been
# reaped (see heartbeat): then whatever a blocking pop just moved into the list goes straight
# back to the queue, so nothing waits in the list of a worker that nobody will reap again.
FETCH = """
if not redis.call('ZSCORE', KEYS[2], ARGV[2]) then
  while redis.call('LMOVE', KEYS[3], KEYS[1], 'RIGHT', ARGV[1]) do end
  return false
end
local out = {}
for i = 1, tonumber(ARGV[3]) do
  local item = redis.call('LMOVE', KEYS[1], KEYS[3], ARGV[1], 'RIGHT')
  if not item then break end
  out[i] = item
end
return {out, redis.call('LLEN', KEYS[1])}
"""

# The dashboard's history rides on the settle scripts, so counting costs no round trip:
# tally(prefix, field, n, extra) adds n to `field` and the "name=count ..." pairs of `extra`
# (failed calls, latency histogram buckets; see history.Tally) to this second's and this
# minute's hash under the declared key prefix (KEYS, last), on Redis's clock. The bucket keys
# extend that prefix, so under Cluster they share its hash tag and slot.
_TALLY = _NOW + """
local function tally(prefix, field, n, extra)
  if n == 0 and extra == '' then return end
  local sec = math.floor(now)
  local skey = prefix .. ':s:' .. sec
  local mkey = prefix .. ':m:' .. math.floor(sec / 60)
  local function add(f, v)
    redis.call('HINCRBY', skey, f, v)
    redis.call('HINCRBY', mkey, f, v)
  end
  if n > 0 then add(field, n) end
  for f, v in string.gmatch(extra, '([%w_:]+)=(%d+)') do add(f, tonumber(v)) end
  redis.call('EXPIRE', skey, 960)
  redis.call('EXPIRE', mkey, 90000)
end
"""

# Settles one call: every fate in one script (Sidekiq's UnitOfWork, for a whole call).
# KEYS: in-flight list, queue, retry zset, dead list, stats hash, history prefix, owners hash.
# ARGV: push command (where the next pop happens), history extra, worker id, key prefix, the
# call's app when several are configured ('' for one; its totals `app:NAME:FIELD` in the
# stats hash, its history under the history prefix's `:app:NAME`), then one op after another,
# each with the item's lane keys joined by newlines ('' for none):
#   a RAW KEYS              delivered: forget it
#   s RAW KEYS              shed by the max-age policy: forget it, count it
#   b RAW KEYS              put back untouched (relay.ownership, 5), in the order given
#   r RAW KEYS WRAPPER SECS retry later: into the retry set, due in SECS (Redis clock)
#   l RAW KEYS WRAPPER SECS set aside: the same, without counting an attempt (relay.engine)
#   d RAW KEYS ENTRY        dead letter: onto the dead list
# Each op acts only if its exact bytes were still in the in-flight list, so a script replayed
# after a lost reply does nothing twice; the keys of what left the window are counted down and
# released when empty (relay.ownership, 4). Returns {1 or 0 per op: it landed; the queue's
# length; how many of this worker's keys have parked items}.
SETTLE = _TALLY + SETTLE_OWNED + """
local me, prefix, app = ARGV[3], ARGV[4], ARGV[5]
local landed, back, counted = {}, {}, {}
local n = {delivered = 0, shed = 0, retried = 0, dead = 0, requeued = 0}
local later = 0
local i = 6
while i <= #ARGV do
  local op, raw, keys = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local hit = redis.call('LREM', KEYS[1], 1, raw)
  landed[#landed + 1] = hit
  local ks = {}
  if hit == 1 and keys ~= '' then
    for k in string.gmatch(keys, '[^\\n]+') do ks[#ks + 1] = k end
    counted[#counted + 1] = ks
  end
  if op == 'a' then
    n.delivered = n.delivered + hit
  elseif op == 's' then
    n.shed = n.shed + hit
  elseif op == 'b' then
    if hit == 1 then back[#back + 1] = {raw, ks} end
  elseif op == 'r' or op == 'l' then
    if hit == 1 then
      redis.call('ZADD', KEYS[3], now + tonumber(ARGV[i + 4]), ARGV[i + 3])
      if op == 'r' then n.retried = n.retried + 1 else later = later + 1 end
    end
    i = i + 2
  elseif op == 'd' then
    if hit == 1 then
      redis.call('RPUSH', KEYS[4], ARGV[i + 3])
      n.dead = n.dead + 1
    end
    i = i + 1
  else
    return redis.error_reply('SETTLE: unknown op ' .. tostring(op))
  end
  i = i + 3
end
put_back(back, KEYS[2], ARGV[1], KEYS[7], me, prefix)
count_down(counted, KEYS[7], me, prefix)
n.requeued = #back + later
for field, stat in pairs({delivered = 'delivered', shed = 'shed_max_age', retried = 'retried',
                          dead = 'dead'}) do
  if n[field] > 0 then
    redis.call('HINCRBY', KEYS[5], stat, n[field])
    if app ~= '' then redis.call('HINCRBY', KEYS[5], 'app:' .. app .. ':' .. stat, n[field]) end
  end
end
local extra = ARGV[2]
for _, field in ipairs({'delivered', 'shed', 'retried', 'dead', 'requeued'}) do
  if n[field] > 0 or extra ~= '' then
    tally(KEYS[6], field, n[field], extra)
    extra = ''
  end
  if n[field] > 0 and app ~= '' then tally(KEYS[6] .. ':app:' .. app, field, n[field], '') end
end
return {landed, redis.call('LLEN', KEYS[2]), redis.call('SCARD', prefix .. ':parked:' .. me)}
"""

# KEYS: retry zset, queue. ARGV: push command, most to move.
# At the head (fifo) the latest-due is pushed first, so the earliest-due is popped first.
_PROMOTE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
local first, last, step = 1, #due, 1
if ARGV[1] == 'LPUSH' then first, last, step = #due, 1, -1 end
for i = first, last, step do
  redis.call('ZREM', KEYS[1], due[i])
  redis.call(ARGV[1], KEYS[2], due[i])
end
"""
PROMOTE = _NOW + _PROMOTE + "return #due\n"

# KEYS: workers zset, info hash. ARGV: worker id, ttl seconds, info JSON.
# Returns 1 when the worker was registered already, 0 when it had been reaped (or is new).
HEARTBEAT = _NOW + """
local known = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
if known then return 1 else return 0 end
"""

# Moves every item of the in-flight lists (KEYS[6..]) back to the queue (KEYS[3]), in order,
# to where the next pop happens (ARGV[2]); adds them to n (a local of the script, from 0).
_DRAIN = """
for i = #KEYS, 6, -1 do
  while redis.call('LMOVE', KEYS[i], KEYS[3], 'RIGHT', ARGV[2]) do n = n + 1 end
end
"""

# KEYS: workers zset, info hash, queue, reaped zset, owners hash, the worker's in-flight
# lists... ARGV: worker id, where the next pop happens (LEFT or RIGHT), force (1 for our own
# shutdown), key prefix, heir (a live worker to hand its channels to; '' for none).
# Hands the worker's channels and window over to the heir if it is alive, else gives its lane
# lists and then its window back to the queue (relay.ownership, 6); unregisters it. Returns
# how many items it moved, or -1 when the worker is alive (or already reaped). A reaped
# worker stays in the reaped set for a while (see SWEEP); one that shut down does not.
REAP = _NOW + HAND_OVER + RETURN_LANES + """
local deadline = redis.call('ZSCORE', KEYS[1], ARGV[1])
if ARGV[3] ~= '1' and ((not deadline) or tonumber(deadline) > now) then return -1 end
local push = 'LPUSH'
if ARGV[2] == 'RIGHT' then push = 'RPUSH' end
local heir_deadline = ARGV[5] ~= '' and redis.call('ZSCORE', KEYS[1], ARGV[5])
local n, parked = 0, 0
if heir_deadline and tonumber(heir_deadline) > now and ARGV[5] ~= ARGV[1] then
  local lists = {}
  for i = 6, #KEYS do lists[#lists + 1] = KEYS[i] end
  parked = hand_over(ARGV[1], ARGV[5], lists, KEYS[3], push, KEYS[5], ARGV[4])
else
  parked = return_lanes(ARGV[1], KEYS[3], push, KEYS[5], ARGV[4])
""" + _DRAIN + """
end
redis.call('ZREM', KEYS[1], ARGV[1])
if ARGV[3] == '1' then
  redis.call('HDEL', KEYS[2], ARGV[1])
else
  redis.call('ZADD', KEYS[4], now, ARGV[1])
end
return n + parked
"""

# The housekeeping of one round in one script, so an idle worker costs one round trip for
# it (issue 11). KEYS: retry zset, queue, stats hash, history prefix, workers zset, reaped
# zset, this worker's parked set. ARGV: push command, most retries to move, longest backlog
# (0: no limit), reap (1: list the expired and the lately reaped workers, for REAP and
# SWEEP), key prefix. Returns {promoted, dropped, queue length, ms until the next retry is
# due (-1: none), expired worker ids, reaped worker ids, how many notifications wait in this
# worker's lane lists}.
MAINTAIN = _TALLY + _PROMOTE + """
local promoted = #due
local dropped = 0
local limit = tonumber(ARGV[3])
if limit > 0 then
  dropped = math.max(0, redis.call('LLEN', KEYS[2]) - limit)
  if dropped > 0 then
    redis.call('LTRIM', KEYS[2], dropped, -1)
    redis.call('HINCRBY', KEYS[3], 'shed_backlog', dropped)
    tally(KEYS[4], 'shed', dropped, '')
  end
end
local next_due = -1
local earliest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if earliest[2] then
  next_due = math.max(0, math.floor((tonumber(earliest[2]) - now) * 1000))
end
local expired, reaped = {}, {}
if ARGV[4] == '1' then
  expired = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now)
  reaped = redis.call('ZRANGE', KEYS[6], 0, -1)
end
local parked = 0
for _, k in ipairs(redis.call('SMEMBERS', KEYS[7])) do
  parked = parked + redis.call('LLEN', ARGV[5] .. ':lane:' .. k)
end
return {promoted, dropped, redis.call('LLEN', KEYS[2]), next_due, expired, reaped, parked}
"""

# A reaped worker may only have been frozen: if it thaws, pops, and dies again before its
# heartbeat registers it anew, what it popped would sit in its lists with nobody to reap it.
# So reaped workers' lists are swept for REAPED_GRACE_S. KEYS and ARGV as REAP, but ARGV[3]:
# the grace in seconds, ARGV[5] the sweeper. A reaped worker that still owns channels was
# reaped by something that does not know ownership (a 1.0 worker during a rolling deploy):
# its channels and lists are handed to the sweeper, else nobody would send what is parked for
# them. Returns items moved, or -1 if the worker is registered again.
SWEEP = _NOW + HAND_OVER + """
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('ZREM', KEYS[4], ARGV[1])
  return -1
end
local n = 0
if ARGV[5] ~= '' and redis.call('EXISTS', ARGV[4] .. ':held:' .. ARGV[1]) == 1 then
  local push = 'LPUSH'
  if ARGV[2] == 'RIGHT' then push = 'RPUSH' end
  local lists = {}
  for i = 6, #KEYS do lists[#lists + 1] = KEYS[i] end
  n = hand_over(ARGV[1], ARGV[5], lists, KEYS[3], push, KEYS[5], ARGV[4])
end
""" + _DRAIN + """
local reaped_at = tonumber(redis.call('ZSCORE', KEYS[4], ARGV[1]) or '0')
if now - reaped_at > tonumber(ARGV[3]) then
  redis.call('ZREM', KEYS[4], ARGV[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
end
return n
"""

# KEYS: queue, retry zset, this worker's in-flight list, its parked set. Returns 1 when
# nothing is left for a burst: the queue is empty, no retry is due, and this worker holds and
# parks nothing; all read at once.
IDLE = _NOW + """
if redis.call('LLEN', KEYS[1]) > 0 then return 0 end
if redis.call('ZCOUNT', KEYS[2], '-inf', now) > 0 then return 0 end
if redis.call('LLEN', KEYS[3]) > 0 then return 0 end
if redis.call('SCARD', KEYS[4]) > 0 then return 0 end
return 1
"""

# KEYS: queue, stats hash, history prefix. ARGV: the longest the queue may be.
# Drops the oldest excess.
TRIM = _TALLY + """
local excess = redis.call('LLEN', KEYS[1]) - tonumber(ARGV[1])
if excess <= 0 then return 0 end
redis.call('LTRIM', KEYS[1], excess, -1)
redis.call('HINCRBY', KEYS[2], 'shed_backlog', excess)
tally(KEYS[3], 'shed', excess, '')
return excess
"""


def has_hash_tag(name: str) -> bool:
    """True when Redis Cluster would hash only part of name: a `{...}` with something in it
    (the first `{` and the first `}` after it, as the server reads it)."""
    start = name.find("{")
    return start >= 0 and name.find("}", start + 1) > start + 1


# KEYS: any key of the queue (so a cluster client sends it to the queue's node). Redis time.
NOW = _NOW + """
return tostring(now)
"""

# KEYS: workers zset. The ids of workers whose heartbeat deadline passed (Redis clock).
EXPIRED = _NOW + """
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
"""

# KEYS: a probe key of the queue (never holds anything for long). Runs, on that key, every
# command the scripts above run, so a Redis ACL user missing one is refused at start
# (NOPERM, naming the command) rather than in the middle of a delivery.
PROBE = _NOW + """
local k = KEYS[1]
redis.call('DEL', k)
redis.call('RPUSH', k, 'p')
redis.call('LPUSH', k, 'p')
redis.call('LMOVE', k, k, 'LEFT', 'RIGHT')
redis.call('LLEN', k)
redis.call('LRANGE', k, 0, -1)
redis.call('LTRIM', k, 0, -1)
redis.call('LREM', k, 0, 'p')
redis.call('ZADD', k, now, 'p')
redis.call('ZSCORE', k, 'p')
redis.call('ZRANGE', k, 0, 0)
redis.call('ZRANGEBYSCORE', k, '-inf', now, 'LIMIT', 0, 1)
redis.call('ZCOUNT', k, '-inf', now)
redis.call('ZREM', k, 'p')
redis.call('HSET', k, 'p', '1')
redis.call('HINCRBY', k, 'p', 1)
redis.call('HEXISTS', k, 'p')
redis.call('HLEN', k)
redis.call('HKEYS', k)
redis.call('EXISTS', k)
redis.call('EXPIRE', k, 60)
redis.call('PEXPIRE', k, 60000)
redis.call('PERSIST', k)
redis.call('HDEL', k, 'p')
redis.call('HSETNX', k, 'p', '1')
redis.call('HGET', k, 'p')
redis.call('DEL', k)
redis.call('SADD', k, 'p')
redis.call('SCARD', k)
redis.call('SMEMBERS', k)
redis.call('SREM', k, 'p')
redis.call('RPUSH', k, 'p', 'q')
redis.call('LINDEX', k, 0)
redis.call('LPOP', k)
redis.call('RPOP', k)
redis.call('SET', k, 'p', 'PX', 1000)
redis.call('GET', k)
redis.call('DEL', k)
return 1
"""


@dataclass(frozen=True)
class Keys:
    """Every key of one queue, derived from its name (and whether Redis is a cluster)."""

    queue: str
    cluster: bool = False

    @property
    def prefix(self) -> str:
        """`Q`, or under Cluster `{Q}`, which hashes to the queue's slot."""
        if self.cluster and not has_hash_tag(self.queue):
            return "{" + self.queue + "}"
        return self.queue

    @property
    def dead(self) -> str:
        return f"{self.prefix}:dead"

    @property
    def retry(self) -> str:
        return f"{self.prefix}:retry"

    @property
    def workers(self) -> str:
        return f"{self.prefix}:workers"

    @property
    def info(self) -> str:
        return f"{self.prefix}:workers:info"

    @property
    def reaped(self) -> str:
        return f"{self.prefix}:workers:reaped"

    @property
    def stats(self) -> str:
        return f"{self.prefix}:stats"

    @property
    def ratelimit(self) -> str:
        return f"{self.prefix}:ratelimit"

    def ratelimit_of(self, app: str) -> str:
        """An app's shared rate limit (RELAY_APPS): `default`'s is the queue's own."""
        return self.ratelimit if app == DEFAULT_APP else f"{self.ratelimit}:{app}"

    @property
    def history(self) -> str:
        """Prefix of the dashboard's per-second and per-minute buckets (see history.py)."""
        return f"{self.prefix}:history"

    @property
    def probe(self) -> str:
        return f"{self.prefix}:probe"

    def inflight(self, worker_id: str, slot: int) -> str:
        return f"{self.prefix}:inflight:{worker_id}:{slot}"

    @property
    def owners(self) -> str:
        """Lane key -> the worker that owns it (relay.ownership)."""
        return f"{self.prefix}:owners"

    def held(self, worker_id: str) -> str:
        return f"{self.prefix}:held:{worker_id}"

    def parked(self, worker_id: str) -> str:
        return f"{self.prefix}:parked:{worker_id}"

    def lane(self, key: str) -> str:
        return f"{self.prefix}:lane:{key}"

    @property
    def pause(self) -> str:
        """Delivery paused, while it exists (relay.pause)."""
        return f"{self.prefix}:pause"

    @property
    def quiet(self) -> str:
        """Worker id -> why it is quiet (relay.pause)."""
        return f"{self.prefix}:quiet"


def is_cluster(client: Any) -> bool:
    """True for redis-py's RedisCluster (absent from old redis-py: then never)."""
    try:
        from redis.cluster import RedisCluster  # noqa: PLC0415
    except ImportError:
        return False
    return isinstance(client, RedisCluster)


def new_worker_id() -> str:
    """host:pid:random, unique even when a pid is reused on another host or after restart."""
    return f"{socket.gethostname()}:{os.getpid()}:{token_hex(3)}"


REAPED_GRACE_S = 3600.0
INFLIGHT_LISTS = 1  # per worker process since 1.1 (one per greenlet slot before)


@dataclass(frozen=True)
class Maintenance:
    """What one housekeeping round did and saw (RedisQueue.maintain)."""

    promoted: int  # due retries moved back to the queue
    dropped: int  # oldest items trimmed off an over-long backlog
    length: int  # the queue's length after both
    next_due_s: float | None  # until the earliest retry left is due; None: no retry
    recovered: dict[str, int]  # worker id -> items returned from its in-flight lists
    parked: int = 0  # notifications in this worker's channels' lane lists (relay.ownership)


class RedisDemoted(redis.ConnectionError):
    """A blocking pop was cut short because the server turned replica (a Sentinel failover
    demoting it): Redis is away, as far as this worker is concerned, until it finds the
    new master."""


class WorkerReaped(RelayError):
    """Another worker declared this one dead (it missed heartbeats); re-register first."""


@dataclass(frozen=True)
class Op:
    """One notification's part of a settle script (see SETTLE): code, its exact bytes, and
    what the code needs (a retry wrapper and delay, or a dead-letter entry)."""

    code: str
    raw: bytes
    args: tuple[Any, ...] = ()
    keys: tuple[str, ...] = ()  # its lane keys, as the fetch read them (relay.ownership)

    @staticmethod
    def ack(raw: bytes, keys: tuple[str, ...] = ()) -> Op:
        return Op("a", raw, keys=keys)

    @staticmethod
    def shed(raw: bytes, keys: tuple[str, ...] = ()) -> Op:
        return Op("s", raw, keys=keys)

    @staticmethod
    def put_back(raw: bytes, keys: tuple[str, ...] = ()) -> Op:
        return Op("b", raw, keys=keys)

    @staticmethod
    def retry(raw: bytes, wrapper: str, delay_s: float, keys: tuple[str, ...] = ()) -> Op:
        return Op("r", raw, (wrapper, delay_s), keys)

    @staticmethod
    def later(raw: bytes, wrapper: str, delay_s: float, keys: tuple[str, ...] = ()) -> Op:
        return Op("l", raw, (wrapper, delay_s), keys)

    @staticmethod
    def dead(raw: bytes, entry: dict[str, Any], keys: tuple[str, ...] = ()) -> Op:
        text = json.dumps(entry, ensure_ascii=False, separators=(",", ":"))
        return Op("d", raw, (text,), keys)


@dataclass(frozen=True)
class Settled:
    """What settling a call did and saw."""

    landed: list[bool]  # per op: it was still in flight, and was carried out
    length: int  # the queue's length after
    parked: int = 0  # keys of this worker with parked items (relay.ownership)


@dataclass(frozen=True)
class Taken:
    """What one fetch brought: the items and their lane keys, in taking order, and what it
    saw (with ownership: relay.ownership)."""

    items: list[tuple[bytes, tuple[str, ...]]]
    length: int | None  # the queue's length after; None when unknown
    parked: int = 0  # keys of this worker with parked items left
    waiting: int = 0  # of those, how many wait for another owner to finish (a takeover)


def split_totals(raw: dict[bytes, Any]) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """The stats hash as read (`Q:stats`): the totals of every app together, and each Pusher
    app's (its fields are `app:<name>:<stat>`)."""
    whole: dict[str, int] = {}
    per_app: dict[str, dict[str, int]] = {}
    for key, value in raw.items():
        field = key.decode()
        if field.startswith("app:"):
            app, _, stat = field[4:].rpartition(":")
            per_app.setdefault(app, {})[stat] = int(value)
        else:
            whole[field] = int(value)
    return whole, per_app


class RedisQueue:
    """The queue's Redis side for one worker process.

    A fetch and a call's settling are one script each, so one round trip; the housekeeping
    and admin calls a few. With `owned` (per-channel order, the default), fetches go through
    the channels' owners (relay.ownership); without, every item goes straight to the window.
    """

    # Of one lane key, a window holds at most this many: three calls' worth, so a busy lane
    # always has its next call ready; the rest is parked (relay.ownership, 2).
    CAP = 30
    # One fetch looks at no more than this many queue items (parking included): a bounded
    # script, even when a busy channel's thousands are parked on the way (at 1,000 its time
    # in Redis delayed the settles of a five-channel drain by a millisecond a call).
    WORK = 250

    def __init__(self, client: redis.Redis, name: str, order: str = "fifo",
                 worker_id: str | None = None, owned: bool = True, spread: int = 1000
                 ) -> None:
        """spread: a backlog longer than this (the window) is shared out between the live
        workers, channel by channel (relay.ownership, 1)."""
        self.client = client
        self.spread = spread
        self.keys = Keys(name, cluster=is_cluster(client))
        self.worker_id = worker_id or new_worker_id()
        self.owned = owned
        # fifo pops the head (oldest); lifo pops the tail (newest). What goes back goes where
        # the next pop happens, so requeued and recovered items are next.
        self.pop_side = "LEFT" if order == "fifo" else "RIGHT"
        self.push_cmd = "LPUSH" if order == "fifo" else "RPUSH"
        self._started_at = time.time()
        # The fetch takes nothing while paused or quiet (relay.pause); what it and MAINTAIN
        # see of that goes to on_gate_state (the worker's OperatorGate).
        self.on_gate_state: Callable[[Seen], None] = lambda seen: None
        self._fetch = client.register_script(gated(TAKE if owned else FETCH))
        self._settle = client.register_script(SETTLE)
        self._lane_keys = client.register_script(LANE_KEYS)
        self._promote = client.register_script(PROMOTE)
        self._maintain = client.register_script(with_state(MAINTAIN))
        self._heartbeat = client.register_script(HEARTBEAT)
        self._reap = client.register_script(REAP)
        self._sweep = client.register_script(SWEEP)
        self._trim = client.register_script(TRIM)
        self._idle = client.register_script(IDLE)
        self._now = client.register_script(NOW)
        self._expired = client.register_script(EXPIRED)
        self._probe = client.register_script(PROBE)

    # -- fetch and settle: the process's window --------------------------------------------

    @property
    def inflight_key(self) -> str:
        """This process's in-flight list. It keeps the name the per-slot lists had for slot 0,
        so workers of the previous version, which reap `slots` lists per worker, reap it."""
        return self.keys.inflight(self.worker_id, 0)

    def _fetch_call(self, most: int) -> tuple[list[str], list[Any]]:
        keys = [self.keys.queue, self.keys.workers, self.inflight_key]
        args: list[Any] = [self.pop_side, self.worker_id, most]
        if self.owned:
            keys.append(self.keys.owners)
            args += [self.CAP, self.WORK, self.keys.prefix, self.spread]
        keys += [self.keys.pause, self.keys.quiet]  # the gate's, last (relay.pause)
        return keys, args

    def _taken(self, found: Any) -> Taken:
        refused = refusal(found)
        if refused is not None:  # paused, or this worker is quiet: nothing was taken
            self.on_gate_state(refused)
            return Taken([], None)
        if found is None:
            raise WorkerReaped(self.worker_id)
        if not self.owned:
            items, length = found
            return Taken([(raw, ()) for raw in items], int(length))
        items, length, parked, waiting = found
        return Taken([(raw, tuple(k.decode() for k in ks)) for raw, ks in items],
                     int(length), int(parked), int(waiting))

    def fetch(self, most: int) -> Taken:
        """Take up to `most` into the in-flight list, never blocking: one round trip."""
        keys, args = self._fetch_call(most)
        return self._taken(self._fetch(keys=keys, args=args))

    def pop(self, block_s: float, most: int) -> Taken:
        """Wait up to block_s for the queue to hold something, then take up to `most` as
        `fetch` does, in the same round trip: a pipeline of BLMOVE from the queue to itself
        (a rotation that leaves the item in place: it only waits) and the fetch script. So
        nothing enters the window but through the script, which reads its channels' owners.
        The window lets one greenlet of the process in here at a time."""
        keys, args = self._fetch_call(most)
        if self.keys.cluster:  # a cluster pipeline cannot carry a script: two round trips
            try:
                self._raise_demoted(self._wait(self.client, block_s))
            except redis.ResponseError as exc:
                self._raise_demoted(exc)
            return self.fetch(most)
        pipe = self.client.pipeline(transaction=False)
        self._wait(pipe, block_s)
        # EVALSHA itself: a Script object would cost the pipeline a round trip
        pipe.evalsha(self._fetch.sha, len(keys), *keys, *args)
        waited, found = pipe.execute(raise_on_error=False)
        self._raise_demoted(waited)
        if isinstance(found, redis.exceptions.NoScriptError):  # Redis restarted: load it
            self.client.script_load(self._fetch.script)
            return self.fetch(most)
        if isinstance(found, Exception):
            raise found
        return self._taken(found)

    def _wait(self, client: Any, block_s: float) -> Any:
        side = self.pop_side
        return client.blmove(self.keys.queue, self.keys.queue, block_s, side, side)

    @staticmethod
    def _raise_demoted(answer: Any) -> None:
        """A blocking pop's error, if it is one. UNBLOCKED ("... instance state changed
        (master -> replica?)") means a failover demoted the server: Redis is away, not the
        item's fault."""
        if isinstance(answer, redis.ResponseError):
            if str(answer).startswith("UNBLOCKED"):
                raise RedisDemoted(str(answer))
            raise answer

    def inflight_items(self) -> list[tuple[bytes, tuple[str, ...]]]:
        """Everything in the in-flight list with its lane keys, in taking order (to adopt
        after a lost reply). Two round trips: a rare path."""
        raws = list(self.client.lrange(self.inflight_key, 0, -1))
        if not raws or not self.owned:
            return [(raw, ()) for raw in raws]
        keys = self._lane_keys(keys=[self.keys.queue], args=raws)
        return [(raw, tuple(k.decode() for k in ks)) for raw, ks in zip(raws, keys, strict=True)]

    def settle(self, ops: Sequence[Op], extra: str = "", app: str = "") -> Settled:
        """Carry out a call's fates in one script.

        `extra` is the dashboard's figures riding along (history.Tally); `app` the Pusher app
        the call went to when several are configured, whose own totals and history are
        counted too ('' with one app: the queue's totals are its own)."""
        args: list[Any] = [self.push_cmd, extra, self.worker_id, self.keys.prefix, app]
        for op in ops:
            args += [op.code, op.raw, "\n".join(op.keys), *op.args]
        keys = [self.inflight_key, self.keys.queue, self.keys.retry, self.keys.dead,
                self.keys.stats, self.keys.history, self.keys.owners]
        landed, length, parked = self._settle(keys=keys, args=args)
        return Settled([bool(x) for x in landed], int(length), int(parked))

    # -- housekeeping, per process -----------------------------------------------------------

    def promote_due(self, limit: int = 500) -> int:
        """Move retries whose time has come back to the queue, next in line."""
        return int(self._promote(keys=[self.keys.retry, self.keys.queue],
                                 args=[self.push_cmd, limit]))

    def heartbeat(self, ttl_s: float, state: dict[str, Any] | None = None) -> bool:
        """Register or refresh this worker; False means it had been reaped (or is new).

        `state` (busy greenlets, gates) rides in the info JSON for the dashboard: no extra
        round trip. `slots` is how many in-flight lists a reaper must look at."""
        info = json.dumps({**(state or {}), "host": socket.gethostname(), "pid": os.getpid(),
                           "slots": INFLIGHT_LISTS, "ttl": ttl_s,
                           # an heir for channels must know ownership (1.0 workers do not)
                           "owns_channels": self.owned,
                           "started_at": self._started_at})
        return bool(self._heartbeat(keys=[self.keys.workers, self.keys.info],
                                    args=[self.worker_id, ttl_s, info]))

    def maintain(self, max_backlog: int, reap: bool, limit: int = 500) -> Maintenance:
        """One housekeeping round in one script: promote due retries, trim the backlog to
        max_backlog (0: no limit), read the queue's length and when the next retry is due;
        with `reap`, also return the items of expired and lately reaped workers (a script
        per such worker: none on a healthy queue)."""
        keys = [self.keys.retry, self.keys.queue, self.keys.stats, self.keys.history,
                self.keys.workers, self.keys.reaped, self.keys.parked(self.worker_id),
                # relay.pause's, last: the operator's state rides on the round
                self.keys.pause, self.keys.quiet, self.keys.held(self.worker_id),
                self.keys.workers]
        promoted, dropped, length, next_due_ms, expired, reaped, parked, *state = \
            self._maintain(keys=keys, args=[self.push_cmd, limit, max_backlog,
                                            "1" if reap else "0", self.keys.prefix,
                                            self.worker_id])
        self.on_gate_state(round_state(state))
        recovered = self._recover(expired, reaped) if expired or reaped else {}
        return Maintenance(int(promoted), int(dropped), int(length),
                           None if int(next_due_ms) < 0 else int(next_due_ms) / 1000,
                           recovered, int(parked))

    def reap_expired(self) -> dict[str, int]:
        """Return the in-flight items of every worker whose heartbeat deadline passed, and
        anything that turned up since in the lists of workers reaped lately."""
        expired = self._expired(keys=[self.keys.workers])
        return self._recover(expired, self.client.zrange(self.keys.reaped, 0, -1))

    def _recover(self, expired: Sequence[bytes], reaped: Sequence[bytes]) -> dict[str, int]:
        recovered: dict[str, int] = {}
        for raw_id in expired:
            wid = raw_id.decode()
            n = self._run_on_worker(self._reap, wid, "0", heir=self.worker_id)
            if n >= 0:
                recovered[wid] = n
        for raw_id in reaped:
            wid = raw_id.decode()
            n = self._run_on_worker(self._sweep, wid, str(REAPED_GRACE_S),
                                    heir=self.worker_id)
            if n > 0:
                recovered[wid] = recovered.get(wid, 0) + n
        return recovered

    def now(self) -> float:
        """Redis time, read on the queue's own node (a bare TIME may go to any node)."""
        return float(self._now(keys=[self.keys.workers]))

    def probe(self) -> None:
        """Run every command the worker needs once, harmlessly, on a key of its own.

        Raises redis.exceptions.NoPermissionError (naming the command) when a Redis ACL
        user lacks one; run at start, so a missing right stops the worker at once.
        """
        key = self.keys.probe
        self.client.script_load(PROBE)  # the scripts are loaded again after a Redis restart
        self._probe(keys=[key])
        self.client.blmove(key, key, 0.01, "LEFT", "RIGHT")
        pipe = self.client.pipeline(transaction=False)
        pipe.llen(key)
        pipe.lrange(key, 0, 0)
        pipe.lrem(key, 1, "p")
        pipe.zrange(key, 0, 0)
        pipe.zrevrange(key, 0, 0)
        pipe.zcard(key)
        pipe.hget(key, "p")
        pipe.hgetall(key)
        pipe.get(key)
        pipe.execute()

    def release(self) -> int:
        """On shutdown: hand this worker's channels, with what it still holds and parks, to
        the livest other worker (in taking order, at the front of their lanes); the last
        worker gives everything back to the queue instead. Then unregister."""
        return self._run_on_worker(self._reap, self.worker_id, "1", INFLIGHT_LISTS,
                                   self._heir())

    def _heir(self) -> str:
        """The livest other worker that keeps channels' order ('' for none): a 1.0 worker,
        or one with RELAY_CHANNEL_ORDER=false, would never send what is parked for them."""
        others = [w for w in self.client.zrevrange(self.keys.workers, 0, 9)
                  if w.decode() != self.worker_id]
        if not others:
            return ""
        for wid, info in zip(others, self.client.hmget(self.keys.info, others), strict=True):
            try:
                if info is not None and json.loads(info).get("owns_channels") is True:
                    return wid.decode()
            except ValueError:
                continue
        return ""

    def _run_on_worker(self, script: Any, wid: str, arg: str, slots: int | None = None,
                       heir: str = "") -> int:
        """REAP or SWEEP for worker `wid`; `heir`: the live worker to hand its channels to (a
        reaper names itself; the script checks it is alive, else the queue gets them)."""
        if slots is None:
            slots = self.worker_slots(wid)
        keys = [self.keys.workers, self.keys.info, self.keys.queue, self.keys.reaped,
                self.keys.owners]
        keys += [self.keys.inflight(wid, n) for n in range(slots)]
        return int(script(keys=keys, args=[wid, self.pop_side, arg, self.keys.prefix, heir]))

    def worker_slots(self, wid: str) -> int:
        """How many in-flight lists worker `wid` has: 1 since 1.1; a worker of the previous
        version had one per greenlet slot and says how many in its info. At least 1, so the
        list `:0` is reaped even when the info entry is gone."""
        raw = self.client.hget(self.keys.info, wid)
        try:
            return max(INFLIGHT_LISTS, int(json.loads(raw)["slots"])) if raw else INFLIGHT_LISTS
        except (ValueError, KeyError, TypeError):
            return INFLIGHT_LISTS

    def trim(self, max_backlog: int) -> int:
        """Drop the oldest items beyond max_backlog; returns how many were dropped."""
        keys = [self.keys.queue, self.keys.stats, self.keys.history]
        return int(self._trim(keys=keys, args=[max_backlog]))

    def idle(self) -> bool:
        """Nothing queued, nothing due for a retry, nothing this worker holds or parks."""
        return bool(self._idle(keys=[self.keys.queue, self.keys.retry, self.inflight_key,
                                     self.keys.parked(self.worker_id)]))

    def length(self) -> int:
        return int(self.client.llen(self.keys.queue))

    def lengths(self) -> dict[str, int]:
        pipe = self.client.pipeline(transaction=False)
        pipe.llen(self.keys.queue)
        pipe.zcard(self.keys.retry)
        pipe.llen(self.keys.dead)
        queue, retry, dead = pipe.execute()
        return {"queue": int(queue), "retry": int(retry), "dead": int(dead)}

    # -- for the admin commands ---------------------------------------------------------------

    def workers(self) -> list[dict[str, Any]]:
        """Registered workers with heartbeat age and in-flight count (Redis clock)."""
        now = self.now()
        found = []
        for raw_id, deadline in self.client.zrange(self.keys.workers, 0, -1, withscores=True):
            wid = raw_id.decode()
            info = json.loads(self.client.hget(self.keys.info, wid) or b"{}")
            slots = int(info.get("slots", 0))
            pipe = self.client.pipeline(transaction=False)
            for n in range(slots):
                pipe.llen(self.keys.inflight(wid, n))
            inflight = sum(pipe.execute()) if slots else 0
            ttl = float(info.get("ttl", 0))
            found.append({"id": wid, "host": info.get("host"), "pid": info.get("pid"),
                          "slots": slots, "inflight": inflight,
                          "heartbeat_age_s": round(now - (deadline - ttl), 3),
                          "expired": deadline < now})
        return found
