"""``python -m relay.pusher_server --port 0 --app-id 1 --key K --secret S [--app ID:KEY:SECRET
...] [--host H] [--print]``

``--app`` adds an app beside the first, with its own credentials (repeatable).

Prints ``LISTENING <port>`` on stdout (the only stdout output, written directly rather
than via logging so that a parent can rely on it whatever the logging setup); ``--print``
logs each event via logging (stderr). Runs until SIGTERM/SIGINT, or until stdin closes
with ``--exit-on-stdin-eof`` (what ``LocalPusher`` uses, so no orphan outlives a test).
"""

import argparse
import logging
import os
import signal
import sys

import gevent
from gevent.event import Event
from gevent.socket import wait_read

from relay.pusher_server.auth import AppCredentials

log = logging.getLogger("relay.pusher_server")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="A local Pusher-compatible HTTP API server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--app-id", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--secret", required=True)
    parser.add_argument("--app", dest="extra_apps", action="append", default=[],
                        type=AppCredentials.parse, metavar="ID:KEY:SECRET",
                        help="another app, with its own credentials (repeatable)")
    parser.add_argument("--print", dest="print_events", action="store_true",
                        help="log every received event (dev mode)")
    parser.add_argument("--max-records", type=int, default=200_000,
                        help="events and request entries kept in memory (oldest dropped)")
    parser.add_argument("--exit-on-stdin-eof", action="store_true",
                        help="stop when stdin closes (LocalPusher uses it: no orphans)")
    return parser.parse_args(argv)


def _stop_on_eof(fd: int, done: Event) -> None:
    """Stop when the parent's end of our stdin closes, so a killed test run leaves no orphan."""
    while True:
        wait_read(fd)
        if not os.read(fd, 4096):
            done.set()
            return


def main(argv: list[str] | None = None) -> int:
    """Run the server until SIGTERM/SIGINT; announce the port on stdout."""
    from gevent import monkey

    monkey.patch_all()
    from relay.pusher_server.server import PusherServer

    args = _parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr,
        format="%(asctime)s %(levelname)s pusher_server: %(message)s",
    )
    server = PusherServer(
        args.app_id, args.key, args.secret, args.print_events, args.max_records,
        args.extra_apps,
    )
    port = server.start(args.host, args.port)
    sys.stdout.write(f"LISTENING {port}\n")
    sys.stdout.flush()
    log.info("local Pusher API for app %s on http://%s:%d", ", ".join(server.apps), args.host,
             port)
    done = Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, done.set)
    if args.exit_on_stdin_eof:
        gevent.spawn(_stop_on_eof, sys.stdin.fileno(), done)
    done.wait()
    server.stop()
    return 0



if __name__ == "__main__":
    sys.exit(main())
