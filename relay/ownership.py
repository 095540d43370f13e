"""Channels owned across processes: the Lua that keeps a channel's order however many worker
processes and hosts share the queue (Kafka's one owner per partition, taken per channel).

A notification's *lane key* is its channel (`app:channel` for an app other than `default`).
Keys for queue `Q` (under Redis Cluster `{Q}:...`, the queue's slot):

- `Q:owners`          hash: lane key -> the worker id that owns it
- `Q:held:<wid>`      hash: lane key -> how many of its notifications wid's window holds; a
                      field exists exactly for the keys wid owns (0 while only parked ones wait)
- `Q:parked:<wid>`    set: keys wid owns whose lane list is not empty
- `Q:lane:<key>`      list: that key's notifications handed over or parked, in taking order

The rules, each carried out inside one script (so two processes never see a half-done step):

1. **Take.** Taking an item from the queue, a process reads its lane keys (TAKE). If it owns
   every key (claiming those nobody owns), and no key's lane list holds anything, it moves the
   item into its window. Otherwise the item is *parked*: appended to the lane list of each of
   its keys, for the owner. So each key has one owner at a time, and its notifications are
   either in the owner's window or behind one another in its lane list. While a backlog
   longer than a window waits, a key nobody owns goes to the live worker that rendezvous
   hashing (highest sha1 of worker and key) picks, whoever takes it: so a drain over many
   channels is shared between the processes instead of going to the first one to fetch; at
   everyday rates the taker claims it itself, so nothing waits for another's blocking pop.
2. **Park a busy key.** An owner holding `cap` of a key's notifications (a few calls' worth)
   parks the next ones too: a busy channel cannot fill the window; the parked ones go before
   any newer one of the key, since a key with a non-empty lane list parks everything newer.
3. **Unpark.** With room in its window, the owner moves the oldest of its lane lists back in,
   each up to `cap`. An item with several keys moves once it is at the head of every one of
   its lane lists; if one of those keys has another owner, it is taken over, but only when
   that owner holds none of it (its older ones are all answered).
4. **Release.** Settling (SETTLE), the owner counts down; at 0 with an empty lane list the
   key is released, so ownership ends when the lane is empty.
5. **Put back.** What goes back untouched goes to the front of its lane lists when they hold
   anything (it is older than what waits there), else to the queue's head.
6. **Hand over.** A worker that stops, or is reaped after missing its heartbeat, hands its
   channels to a live worker (the reaper, or on a stop the livest other one): what its
   window held goes to the front of those lane lists, in taking order, and the keys with
   their parked lists become the heir's, which sends them in order. A handed-over or parked
   notification is recovered exactly like an in-flight one. Only the last worker to stop
   gives everything back to the queue instead, lanes merged in taking order.
7. **Mixed versions.** Only workers whose heartbeat info says `owns_channels` are given keys
   or channels (a 1.0 worker in a rolling deploy never reads lane lists). A key whose owner
   is no longer registered, because something that knows no ownership stopped or reaped it,
   is taken over by the next worker to take one of its notifications, and a reaped worker's
   keys by the next sweep (relay.queue's SWEEP).

Every key a script touches is named from the declared prefix (like the history buckets), so
under Cluster all of them share the queue's hash tag and slot.
"""

from __future__ import annotations

# The lane keys of a queue element, as the worker's parser reads it (relay.wire): a classic
# message's `channel`; an envelope's `channels` (a string or a list), prefixed by its `app`
# unless that is `default`; a retry wrapper's payload, once. nil: none can be read (not JSON,
# no channel, a name no lane key may have): such an item is nobody's and goes straight to the
# window, where the parser dead-letters it.
KEYS_OF = """
local function lane_name(c)
  return type(c) == 'string' and #c > 0 and #c <= 300 and not string.find(c, '[%c%s]')
end
local function keys_of_obj(obj, depth)
  if type(obj) ~= 'table' then return nil end
  if obj.channel ~= nil then
    if lane_name(obj.channel) then return {obj.channel} end
    return nil
  end
  if obj.relay ~= 1 and obj.relay ~= 2 then return nil end
  if obj.payload ~= nil then
    if depth > 0 or type(obj.payload) ~= 'string' then return nil end
    local ok, inner = pcall(cjson.decode, obj.payload)
    if not ok then return nil end
    return keys_of_obj(inner, 1)
  end
  local list = obj.channels
  if type(list) == 'string' then list = {list} end
  if type(list) ~= 'table' or #list == 0 or #list > 100 then return nil end
  local app, pre = obj.app, ''
  if app ~= nil and app ~= cjson.null and app ~= 'default' then
    if type(app) ~= 'string' or #app > 64 or not string.match(app, '^[%w_-]+$') then
      return nil
    end
    pre = app .. ':'
  end
  local seen, out = {}, {}
  for _, c in ipairs(list) do
    if not lane_name(c) then return nil end
    local k = pre .. c
    if not seen[k] then
      seen[k] = true
      out[#out + 1] = k
    end
  end
  return out
end
local function keys_of(raw)
  local ok, obj = pcall(cjson.decode, raw)
  if not ok then return nil end
  return keys_of_obj(obj, 0)
end
"""

# Names of the per-worker and per-key structures, from the prefix (ARGV) and a worker id.
_NAMES = """
local function lane(prefix, k) return prefix .. ':lane:' .. k end
local function held_of(prefix, w) return prefix .. ':held:' .. w end
local function parked_of(prefix, w) return prefix .. ':parked:' .. w end
"""

# KEYS: queue, workers zset, in-flight list, owners hash.
# ARGV: pop side, worker id, room (most to move into the window), cap (most of one key in the
# window), work (most queue items to look at), prefix, spread (a backlog longer than this is
# shared out: new keys go to the worker rendezvous hashing picks).
# Returns false when this worker was reaped (see FETCH), else {the items moved into the
# window, each {raw, {its lane keys}}, in taking order; the queue's length after; the number
# of keys with parked items; how many of those wait for another owner (a takeover)}.
TAKE = KEYS_OF + _NAMES + """
local queue, inflight, owners = KEYS[1], KEYS[3], KEYS[4]
local side, me, prefix = ARGV[1], ARGV[2], ARGV[6]
local room, cap, work = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
if not redis.call('ZSCORE', KEYS[2], me) then
  while redis.call('LMOVE', inflight, queue, 'RIGHT', side) do end
  return false
end
local held, parked = held_of(prefix, me), parked_of(prefix, me)
local out, waiting = {}, 0
local seen = {}
-- An owner that is not registered left without handing its keys over (only something that
-- knows no ownership does that: a 1.0 worker's stop, or its reaping of a 1.1 worker).
local function registered(w)
  if seen[w] == nil then seen[w] = redis.call('ZSCORE', KEYS[2], w) ~= false end
  return seen[w]
end
local function take_over(k, w)
  redis.call('HDEL', held_of(prefix, w), k)
  redis.call('SREM', parked_of(prefix, w), k)
  redis.call('HSET', owners, k, me)
  redis.call('HSETNX', held, k, 0)
  if redis.call('LLEN', lane(prefix, k)) > 0 then redis.call('SADD', parked, k) end
end

local function own(k, w)
  redis.call('HSET', owners, k, w)
  redis.call('HSETNX', held_of(prefix, w), k, 0)
end
local function count(w, k)
  return tonumber(redis.call('HGET', held_of(prefix, w), k) or '0')
end
local function into_window(raw, ks)
  redis.call('RPUSH', inflight, raw)
  for _, x in ipairs(ks) do redis.call('HINCRBY', held, x, 1) end
  out[#out + 1] = {raw, ks}
  room = room - 1
end

-- 1. Unpark: the heads of this worker's lane lists, oldest first within each.
local function unpark_head(k)
  local head = redis.call('LINDEX', lane(prefix, k), 0)
  if not head then return 'empty' end
  local ks = keys_of(head) or {k}
  if #ks == 1 then
    if count(me, k) >= cap then return 'capped' end
  else
    for _, x in ipairs(ks) do
      if x ~= k then
        if redis.call('LINDEX', lane(prefix, x), 0) ~= head then return 'waiting' end
        local o = redis.call('HGET', owners, x)
        if o and o ~= me and count(o, x) > 0 then return 'waiting' end
      end
    end
    for _, x in ipairs(ks) do
      local o = redis.call('HGET', owners, x)
      if o ~= me then
        if o then
          redis.call('HDEL', held_of(prefix, o), x)
          redis.call('SREM', parked_of(prefix, o), x)
        end
        own(x, me)
      end
    end
  end
  for _, x in ipairs(ks) do
    redis.call('LPOP', lane(prefix, x))
    if redis.call('LLEN', lane(prefix, x)) > 0 then
      redis.call('SADD', parked, x)
    else
      redis.call('SREM', parked, x)
    end
  end
  into_window(head, ks)
  return 'moved'
end
-- Rounds over the parked keys until nothing moves: an envelope moved from one lane may let
-- another lane's head go.
local progress = true
while progress and room > 0 do
  progress, waiting = false, 0
  for _, k in ipairs(redis.call('SMEMBERS', parked)) do
    if room <= 0 then break end
    local step = unpark_head(k)
    while step == 'moved' do
      progress = true
      if room <= 0 then break end
      step = unpark_head(k)
    end
    if step == 'empty' then redis.call('SREM', parked, k) end
    if step == 'waiting' then waiting = waiting + 1 end
  end
end

-- 2. Take from the queue: into the window, or parked for the owner. A key nobody owns is
-- claimed by this worker; but while a backlog longer than `spread` waits, by the live worker
-- that rendezvous hashing picks for it (relay.ownership, 1), so a drain is shared.
local peek = 0
if side == 'RIGHT' then peek = -1 end
local looked = 0
local spread = tonumber(ARGV[7])
local live = nil
-- Workers that keep channels' order (a 1.0 worker in a rolling deploy does not, and would
-- never send what is parked for it): their heartbeat info says owns_channels.
local function keeps_order(w)
  local ok, info = pcall(cjson.decode, redis.call('HGET', KEYS[2] .. ':info', w) or '')
  return ok and type(info) == 'table' and info.owns_channels == true
end
local function chooser(k)
  if redis.call('LLEN', queue) <= spread then return me end
  if not live then
    local t = redis.call('TIME')
    live = {}
    for _, w in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], tonumber(t[1]), '+inf')) do
      if w == me or keeps_order(w) then live[#live + 1] = w end
    end
  end
  local best, score = me, nil
  for _, w in ipairs(live) do
    local s = redis.sha1hex(w .. '\0' .. k)
    if not score or s > score then best, score = w, s end
  end
  return best
end
while room > 0 and looked < work do
  local item = redis.call('LINDEX', queue, peek)
  if not item then break end
  looked = looked + 1
  local ks = keys_of(item)
  if not ks then
    redis.call('LMOVE', queue, inflight, side, 'RIGHT')
    out[#out + 1] = {item, {}}
    room = room - 1
  else
    local target, mine = nil, true
    local found = {}
    for i, x in ipairs(ks) do
      found[i] = redis.call('HGET', owners, x)
      if found[i] and found[i] ~= me and not registered(found[i]) then
        take_over(x, found[i])  -- its owner left without handing it over: an orphan
        found[i] = me
      end
      if found[i] then
        target = target or found[i]
        if found[i] ~= me then mine = false end
      end
    end
    if not target then
      target = chooser(ks[1])
      mine = target == me
    end
    for i, x in ipairs(ks) do
      if not found[i] then own(x, target) end
    end
    local direct = mine
    for _, x in ipairs(ks) do
      if not direct then break end
      if redis.call('LLEN', lane(prefix, x)) > 0 then direct = false end
      if #ks == 1 and count(me, x) >= cap then direct = false end
    end
    if side == 'LEFT' then redis.call('LPOP', queue) else redis.call('RPOP', queue) end
    if direct then
      into_window(item, ks)
    else
      for _, x in ipairs(ks) do
        redis.call('RPUSH', lane(prefix, x), item)
        redis.call('SADD', parked_of(prefix, redis.call('HGET', owners, x)), x)
      end
    end
  end
end
return {out, redis.call('LLEN', queue), redis.call('SCARD', parked), waiting}
"""

# The ownership part of settling a call (relay.queue's SETTLE, which declares the owners hash
# and passes ME and PREFIX): `back` holds the put-backs {raw, keys}, `counted` the keys of
# every notification that left the window. Put-backs go to the front of their lane lists when
# any of those holds anything (then the whole item goes to each of its lists), else to the
# queue's head, in the order given; then the counts go down and empty keys are released.
SETTLE_OWNED = _NAMES + """
local function put_back(back, queue, push, owners, me, prefix)
  local parked = parked_of(prefix, me)
  local to_lanes = {}
  for _, b in ipairs(back) do
    for _, x in ipairs(b[2]) do
      if redis.call('LLEN', lane(prefix, x)) > 0 then to_lanes[x] = true end
    end
  end
  local changed = true
  while changed do
    changed = false
    for _, b in ipairs(back) do
      if not b.lanes then
        for _, x in ipairs(b[2]) do
          if to_lanes[x] then b.lanes = true end
        end
        if b.lanes then
          for _, x in ipairs(b[2]) do
            if not to_lanes[x] then
              to_lanes[x] = true
              changed = true
            end
          end
        end
      end
    end
  end
  for j = #back, 1, -1 do
    local b = back[j]
    if b.lanes then
      for _, x in ipairs(b[2]) do
        redis.call('LPUSH', lane(prefix, x), b[1])
        redis.call('SADD', parked, x)
      end
    else
      redis.call(push, queue, b[1])
    end
  end
end
local function count_down(counted, owners, me, prefix)
  local held, parked = held_of(prefix, me), parked_of(prefix, me)
  for _, ks in ipairs(counted) do
    for _, x in ipairs(ks) do
      if redis.call('HINCRBY', held, x, -1) <= 0 then
        if redis.call('HGET', owners, x) ~= me then
          redis.call('HDEL', held, x)
        elseif redis.call('LLEN', lane(prefix, x)) == 0 then
          redis.call('HDEL', held, x)
          redis.call('HDEL', owners, x)
          redis.call('SREM', parked, x)
        else
          redis.call('HSET', held, x, 0)
          redis.call('SADD', parked, x)
        end
      end
    end
  end
end
"""

# Hands worker `w`'s channels over to `heir`, a live worker (relay.ownership, 6): what w's
# window held goes to the front of its lane lists (newest first, so they keep their order,
# older than anything parked), then every key w owns becomes heir's, parked lists included.
# What has no lane key goes back to the queue. Used by relay.queue's REAP, which declares the
# queue, the owners hash and w's in-flight lists. Returns how many items it moved.
HAND_OVER = KEYS_OF + _NAMES + """
local function hand_over(w, heir, lists, queue, push, owners, prefix)
  local n = 0
  for i = #lists, 1, -1 do
    local item = redis.call('RPOP', lists[i])
    while item do
      local ks = keys_of(item)
      local owned = ks ~= nil
      for _, x in ipairs(ks or {}) do
        if redis.call('HGET', owners, x) ~= w then owned = false end
      end
      if owned then
        for _, x in ipairs(ks) do redis.call('LPUSH', lane(prefix, x), item) end
      else
        redis.call(push, queue, item)
      end
      n = n + 1
      item = redis.call('RPOP', lists[i])
    end
  end
  for _, k in ipairs(redis.call('HKEYS', held_of(prefix, w))) do
    if redis.call('HGET', owners, k) == w then
      redis.call('HSET', owners, k, heir)
      redis.call('HSETNX', held_of(prefix, heir), k, 0)
      if redis.call('LLEN', lane(prefix, k)) > 0 then
        redis.call('SADD', parked_of(prefix, heir), k)
      end
    end
  end
  redis.call('DEL', held_of(prefix, w), parked_of(prefix, w))
  return n
end
"""

# With no live worker to hand them to (the last one stopping): gives back the lane lists of
# worker `w` to the queue, newest first, from the tails, each item once (an item with several
# keys is in each of their lists: it goes back when it is the newest of all of them; from
# another owner's list it is only removed), pushed where the next pop happens, so the queue
# gets them in taking order; then releases w's keys. REAP then gives w's window back in front
# of these. Returns how many items went back.
RETURN_LANES = """
local function return_lanes(w, queue, push, owners, prefix)
  local mine = {}
  for _, k in ipairs(redis.call('HKEYS', held_of(prefix, w))) do
    if redis.call('HGET', owners, k) == w and redis.call('LLEN', lane(prefix, k)) > 0 then
      mine[k] = true
    end
  end
  local n = 0
  local function drop_elsewhere(x, item)
    redis.call('LREM', lane(prefix, x), -1, item)
    if redis.call('LLEN', lane(prefix, x)) == 0 then
      local o = redis.call('HGET', owners, x)
      if o then
        redis.call('SREM', parked_of(prefix, o), x)
        if tonumber(redis.call('HGET', held_of(prefix, o), x) or '0') == 0 then
          redis.call('HDEL', held_of(prefix, o), x)
          redis.call('HDEL', owners, x)
        end
      end
    end
  end
  while next(mine) do
    local progressed = false
    for k in pairs(mine) do
      local tail = redis.call('LINDEX', lane(prefix, k), -1)
      if not tail then
        mine[k] = nil
      else
        local ks = keys_of(tail) or {k}
        local newest = true
        for _, x in ipairs(ks) do
          if x ~= k and mine[x] and redis.call('LINDEX', lane(prefix, x), -1) ~= tail then
            newest = false
          end
        end
        if newest then
          redis.call('RPOP', lane(prefix, k))
          for _, x in ipairs(ks) do
            if x ~= k then
              if mine[x] then redis.call('RPOP', lane(prefix, x)) else drop_elsewhere(x, tail) end
            end
          end
          redis.call(push, queue, tail)
          n = n + 1
          progressed = true
        end
      end
    end
    if not progressed then  -- lists out of step (never made by these scripts): as they are
      for k in pairs(mine) do
        local item = redis.call('RPOP', lane(prefix, k))
        while item do
          redis.call(push, queue, item)
          n = n + 1
          item = redis.call('RPOP', lane(prefix, k))
        end
        mine[k] = nil
      end
    end
  end
  for _, k in ipairs(redis.call('HKEYS', held_of(prefix, w))) do
    if redis.call('HGET', owners, k) == w then redis.call('HDEL', owners, k) end
  end
  redis.call('DEL', held_of(prefix, w), parked_of(prefix, w))
  return n
end
"""

# KEYS: any key of the queue. ARGV: items. Each item's lane keys, as TAKE reads them (for
# what the window adopts after a lost reply).
LANE_KEYS = KEYS_OF + """
local out = {}
for i = 1, #ARGV do out[i] = keys_of(ARGV[i]) or {} end
return out
"""
