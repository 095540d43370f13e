"""A local Pusher-compatible HTTP API server for tests, dev mode and benchmarks.

1. ``wire``: HTTP/1.1 keep-alive on a raw socket (the fault modes need the socket).
2. ``auth`` and ``validate``: Pusher's authentication and request rules, with Pusher's
   status codes; the limits come from ``relay.rules``, shared with relay's own parser.
3. ``modes``: run-time faults and other servers' dialects (soketi, Laravel Reverb, sockudo).
4. ``server``: state, recording and the ``/_control/`` API.
5. ``__main__``: ``python -m relay.pusher_server`` (prints ``LISTENING <port>``).
6. ``local``: ``LocalPusher`` runs that command in a child process and drives it.

Importing this package does not import gevent: ``LocalPusher`` and the pure request
parsers are usable from any parent process.
"""

from relay.pusher_server.auth import AppCredentials
from relay.pusher_server.local import LocalPusher
from relay.pusher_server.protocol import ApiError
from relay.pusher_server.validate import parse_batch, parse_trigger

__all__ = ["ApiError", "AppCredentials", "LocalPusher", "parse_batch", "parse_trigger"]
