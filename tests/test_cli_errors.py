"""The argument parser's errors never echo a secret (relay/cli.py Parser.error): argparse
repeats what it did not understand, and a mistyped flag often carries a URL with a password."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support import ROOT

SECRET = "s3cr3t-VALUE"


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RELAY_", "PUSHER_", "REDIS_"))}
    return subprocess.run([sys.executable, str(ROOT / "worker.py"), *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize(("argv", "shown"), [
    # A mistyped flag with its value attached, or as the next word.
    ([f"--pusher-urll=https://key:{SECRET}@api.pusher.com/apps/1"], "--pusher-urll"),
    # (the value, as the next word, is then taken for a subcommand: "invalid choice")
    (["--pusher-secret-key", SECRET], "invalid choice"),
    # A stray word is taken for a subcommand: "invalid choice" would repeat it.
    ([f"https://key:{SECRET}@api.pusher.com/apps/1"], "invalid choice"),
    # Any other error that quotes a URL with credentials: the userinfo is masked.
    (["--redis-url"], "--redis-url"),
    (["stats", "--redis-url", f"redis://:{SECRET}@cache:6379/0", f"--bogus={SECRET}"],
     "--bogus"),
])
def test_parser_errors_never_show_a_secret(argv: list[str], shown: str) -> None:
    done = run(*argv)
    assert done.returncode == 2, done
    assert shown in done.stderr, done.stderr
    assert "usage:" in done.stderr
    assert SECRET not in done.stderr + done.stdout, done.stderr


def test_a_url_in_an_error_message_is_masked() -> None:
    from relay.cli import Parser

    parser = Parser(prog="worker.py")
    with pytest.raises(SystemExit) as exit_info, pytest.MonkeyPatch.context() as mp:
        written: list[str] = []
        mp.setattr(sys, "stderr", type("W", (), {"write": lambda _s, t: written.append(t),
                                                  "flush": lambda _s: None})())
        parser.error(f"argument --pusher-url: bad value https://key:{SECRET}@h/apps/1")
    assert exit_info.value.code == 2
    text = "".join(written)
    assert SECRET not in text and "https://***@h/apps/1" in text, text
