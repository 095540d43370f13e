"""The dead-letter list `Q:dead`, for the admin commands: list, requeue, purge.

The worker only ever appends to it (RedisQueue.dead_letter, in the script that removes the
item from its in-flight list); reading it back and moving entries out is an operator's job.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable

import redis

from relay.queue import Keys

log = logging.getLogger(__name__)

# KEYS: dead list, queue. ARGV: the exact dead-letter entry, payload to requeue.
# Removing the exact entry first makes two operators requeueing at once harmless.
UNDEAD = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
redis.call('RPUSH', KEYS[2], ARGV[2])
return 1
"""


def is_invalid(entry: bytes) -> bool:
    """A dead letter of class `invalid`: the worker refused it before any call (not JSON, a
    bad channel, too large...), so requeued as it is, it comes straight back."""
    try:
        found = json.loads(entry)
    except ValueError:
        return False
    return isinstance(found, dict) and found.get("error_class") == "invalid"


class DeadLetters:
    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys
        self._undead = client.register_script(UNDEAD)

    def entries(self, limit: int = -1) -> list[bytes]:
        return list(self.client.lrange(self.keys.dead, 0, limit - 1 if limit > 0 else -1))

    def count(self) -> int:
        return int(self.client.llen(self.keys.dead))

    def requeue(self, entries: Iterable[bytes]) -> int:
        """Move dead letters back to the queue's tail as the producer pushed them.

        Each entry is removed by its exact bytes before its payload is pushed, in one script:
        two operators requeueing at once requeue each entry once.
        """
        n = 0
        for entry in entries:
            try:
                payload = json.loads(entry)["payload"]
            except (ValueError, KeyError, TypeError):
                log.warning("skipping a dead letter that is not relay's JSON")
                continue
            n += int(self._undead(keys=[self.keys.dead, self.keys.queue], args=[entry, payload]))
        return n

    def purge(self, entries: Iterable[bytes]) -> int:
        pipe = self.client.pipeline(transaction=False)
        for entry in entries:
            pipe.lrem(self.keys.dead, 1, entry)
        return sum(pipe.execute())
