"""The least a Python relay on relay's stack can do per notification: the CPU floor.

gevent (monkey-patched), redis-py, the pusher library's request signing and relay's
geventhttpclient backend, one greenlet, nothing else: no pool, no ordering, no metrics, no
housekeeping, no retries. Each notification costs what it must:
- `--ack` (default): BLMOVE into an in-flight list, sign + POST, then an ack script (LREM):
  the round trips any reliable relay needs;
- `--no-ack`: BLPOP, sign + POST: exactly the seed script's work, with no reliability at all.
The everyday scenario runs it beside relay and the seed (variants floor and floor-noack), so
the table shows how far relay is from its floor, and where that floor stands against the seed.

Run by bench/everyday.py; by hand: REDIS_URL=... PUSHER_URL=... RELAY_QUEUE=notifications
  .venv/bin/python bench/floor.py [--no-ack]
"""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import redis  # noqa: E402
from pusher.http import POST, Request  # noqa: E402
from pusher.pusher_client import PusherClient  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from relay.config import parse_pusher_url  # noqa: E402
from relay.delivery import GeventHttpBackend  # noqa: E402

ACK = "return redis.call('LREM', KEYS[1], 1, ARGV[1])"


def main() -> None:
    ack = "--no-ack" not in sys.argv[1:]
    queue = os.environ.get("RELAY_QUEUE", "notifications")
    inflight = f"{queue}:floor:inflight"
    client = redis.Redis(connection_pool=redis.BlockingConnectionPool.from_url(
        os.environ["REDIS_URL"], max_connections=2, timeout=20))
    target = parse_pusher_url(os.environ["PUSHER_URL"], timeout=5.0)
    pusher = PusherClient(app_id=target.app_id, key=target.key, secret=target.secret,
                          host=target.host, port=target.port, ssl=target.ssl,
                          backend=GeventHttpBackend, pool_size=1)
    acknowledge = client.register_script(ACK)
    path = f"/apps/{pusher.app_id}/events"
    sys.stderr.write("started: the floor loop\n")  # the bench's ready line, as relay's log
    sys.stderr.flush()
    while True:
        if ack:
            raw = client.blmove(queue, inflight, 3, "LEFT", "RIGHT")
        else:
            popped = client.blpop([queue], 3)
            raw = popped[1] if popped else None
        if raw is None:
            continue
        data = json.loads(raw)
        channel = data.pop("channel")
        request = Request(pusher, POST, path, {"name": "hit", "channels": [channel],
                                              "data": json.dumps(data)})
        pusher.http.send_request(request)
        if ack:
            acknowledge(keys=[inflight], args=[raw])


if __name__ == "__main__":
    main()
