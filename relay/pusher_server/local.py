"""``LocalPusher``: the server in a child process, for tests, the benchmark and dev mode.

The child is ``python -m relay.pusher_server``; the parent needs no gevent and talks to the
control API with stdlib ``urllib`` only, which works in plain and gevent-patched parents.
With ``extra_apps`` it serves several apps, each with its own credentials: ``url_for(id)``
is one app's PUSHER_URL, ``apps_toml`` a RELAY_APPS file for them, and the control methods
take ``app_id=`` for one app's events, counts and fault modes.
"""

import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any, NoReturn
from urllib.parse import quote, urlencode

from relay.pusher_server.auth import AppCredentials

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
WAIT_POLL_S = 0.01


StderrTarget = int | IO[Any] | str | os.PathLike[str] | None


class LocalPusher:
    """Runs the server as a child process so parents need no gevent and get real sockets.

    Usable as a context manager. Control calls use urllib, which works in plain and
    gevent-patched parents alike.

    ``stderr`` is where the server's log goes: None (the default) inherits the parent's
    stderr; a path is opened for writing (truncated) at each start and closed at stop; an
    open file object, a file descriptor or ``subprocess.DEVNULL`` is passed as is (and left
    open). ``subprocess.PIPE`` and ``subprocess.STDOUT`` are refused: nobody would read
    the pipe, and stdout carries the ``LISTENING`` line.
    """

    def __init__(
        self,
        app_id: str = "1",
        key: str = "test-key",
        secret: str = "test-secret",
        print_events: bool = False,
        python: str = sys.executable,
        host: str = "127.0.0.1",
        startup_timeout: float = 15.0,
        stderr: StderrTarget = None,
        extra_apps: Sequence[AppCredentials] = (),
    ) -> None:
        if stderr in (subprocess.PIPE, subprocess.STDOUT):
            raise ValueError("stderr=PIPE or STDOUT would block or corrupt the server's output; "
                             "pass a path, a file, DEVNULL or None")
        self.app_id, self.key, self.secret = app_id, key, secret
        self.apps = {app.app_id: app for app in (AppCredentials(app_id, key, secret),
                                                 *extra_apps)}
        if len(self.apps) != 1 + len(extra_apps):
            raise ValueError("every app needs an id of its own")
        self.print_events = print_events
        self.python = python
        self.host = host
        self.port = 0
        self.startup_timeout = startup_timeout
        self.stderr = stderr
        self._process: subprocess.Popen[bytes] | None = None
        self._stderr_file: IO[bytes] | None = None

    def __enter__(self) -> "LocalPusher":
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """PUSHER_URL-style URL for relay's config (pusher 3.3.4's from_url mangles ports)."""
        return self.url_for(self.app_id)

    def url_for(self, app_id: str) -> str:
        """One app's PUSHER_URL (KeyError for an app the server does not have)."""
        app = self.apps[app_id]
        key, secret = quote(app.key, safe=""), quote(app.secret, safe="")
        return f"http://{key}:{secret}@{self.host}:{self.port}/apps/{app.app_id}"

    def apps_toml(self, names: Mapping[str, str]) -> str:
        """A RELAY_APPS file: ``{relay's app name: this server's app id}``, one table each."""
        return "".join(f"[apps.{name}]\nurl = {json.dumps(self.url_for(app_id))}\n\n"
                       for name, app_id in names.items())

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        """The server process's id (for /proc readings); RuntimeError when not started."""
        if self._process is None:
            raise RuntimeError("LocalPusher is not running: call start() first")
        return self._process.pid

    def start(self) -> None:
        """Spawn the server and wait for its ``LISTENING <port>`` line."""
        command = [
            self.python, "-m", "relay.pusher_server", "--host", self.host, "--port", "0",
            "--app-id", self.app_id, "--key", self.key, "--secret", self.secret,
            "--exit-on-stdin-eof",
        ]
        for app in list(self.apps.values())[1:]:
            command += ["--app", app.as_arg()]
        if self.print_events:
            command.append("--print")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
        stderr: Any = self.stderr
        if isinstance(stderr, str | os.PathLike):
            stderr = self._stderr_file = open(stderr, "wb")  # closed in stop()
        try:
            self._process = subprocess.Popen(
                command, cwd=REPO_ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=stderr,
            )
        except BaseException:
            self._close_stderr_file()
            raise
        try:
            self.port = self._read_port()
        except BaseException:
            self.stop()
            raise

    def _read_port(self) -> int:
        assert self._process is not None and self._process.stdout is not None
        ready, _, _ = select.select([self._process.stdout], [], [], self.startup_timeout)
        if not ready:
            raise TimeoutError(f"pusher_server gave no LISTENING line in {self.startup_timeout}s")
        line = self._process.stdout.readline().decode("utf-8", "replace")
        if not line.startswith("LISTENING "):
            raise RuntimeError(
                f"pusher_server failed to start (exit code {self._process.poll()}, "
                f"first stdout line {line!r}; see its stderr)"
            )
        return int(line.split()[1])

    def _close_stderr_file(self) -> None:
        stderr_file, self._stderr_file = self._stderr_file, None
        if stderr_file is not None:
            stderr_file.close()

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate the child, kill it if it does not exit in time. Idempotent."""
        process, self._process = self._process, None
        if process is None:
            self._close_stderr_file()
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                pipe.close()
        self._close_stderr_file()

    def _call(self, method: str, path: str, payload: Any = None) -> Any:
        import urllib.error
        import urllib.request

        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(
            self.base_url + path, data=data, method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            raise ValueError(f"{method} {path}: {error.code} {error.read().decode()}") from None

    def set_mode(self, app_id: str | None = None, **modes: Any) -> dict[str, Any]:
        """Replace all fault modes and the dialect (see ``modes.Modes``); unknown names raise
        ValueError. With ``app_id``, that app's modes only (they replace the server-wide
        ones for it); without, the whole server's, and every app's own are dropped."""
        body = modes if app_id is None else dict(modes, app_id=app_id)
        return self._call("POST", "/_control/mode", body)

    def clear_mode(self, app_id: str | None = None) -> None:
        """A healthy server (or app: healthy whatever the server-wide modes)."""
        self.set_mode(app_id)

    @staticmethod
    def _query(app_id: str | None) -> str:
        return "" if app_id is None else "?" + urlencode({"app_id": app_id})

    def events(self, app_id: str | None = None) -> list[dict[str, Any]]:
        """Every event recorded (or one app's), each with its ``app_id``."""
        return self._call("GET", "/_control/events" + self._query(app_id))

    def count(self, app_id: str | None = None) -> dict[str, int]:
        """``{"events_total": N, "requests_total": M}``: cheap, whatever the record count."""
        return self._call("GET", "/_control/count" + self._query(app_id))

    def order(self, app_id: str | None = None) -> dict[str, list[str]]:
        """Each channel's event data (plaintext when decrypted) in the order accepted."""
        return self._call("GET", "/_control/order" + self._query(app_id))

    def stats(self, requests: bool = True) -> dict[str, Any]:
        """Counters and modes; ``requests=False`` leaves out the per-request list."""
        return self._call("GET", "/_control/stats" + ("" if requests else "?requests=0"))

    def reset(self) -> None:
        """Forget events, counters and modes (between tests)."""
        self._call("POST", "/_control/reset", {})

    def wait_for_events(self, n: int, timeout: float = 30.0, app_id: str | None = None
                        ) -> list[dict[str, Any]]:
        """Poll until at least n events were recorded (for one app, with ``app_id``), then
        return them all.

        Polls the cheap count endpoint and fetches the event list once, when enough have
        arrived (or at the deadline, for the TimeoutError that says what did arrive). The
        default deadline is long: it costs nothing when things work, and a loaded CI machine
        needs the margin.
        """
        deadline = time.monotonic() + timeout
        while self._counted(app_id) < n:
            if time.monotonic() >= deadline:
                self._timed_out(n, timeout, app_id)
            time.sleep(WAIT_POLL_S)
        return self.events() if app_id is None else self.events(app_id)

    def _counted(self, app_id: str | None) -> int:
        # count() with no argument when no app is asked for: tests stub count() that way
        return (self.count() if app_id is None else self.count(app_id))["events_total"]

    def _timed_out(self, n: int, timeout: float, app_id: str | None = None) -> NoReturn:
        events = self.events() if app_id is None else self.events(app_id)
        stats = self.stats(requests=False)
        seen = [(e["channel"], e["name"]) for e in events[-5:]]
        raise TimeoutError(
            f"expected {n} events within {timeout}s, got {len(events)} "
            f"(last: {seen}); requests_total={stats['requests_total']} "
            f"by_status={stats['by_status']} faults={stats['faults']} "
            f"modes={ {k: v for k, v in stats['modes'].items() if v} }"
        )
