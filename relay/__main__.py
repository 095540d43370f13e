"""The `relay` command (and `python -m relay`): the same program as `python worker.py`.

gevent must patch the standard library before anything else imports socket or ssl, so
these are the first lines that run: the console script imports this module before
anything of relay's, and the package's __init__ imports nothing (the producer helper
shares the package inside apps that never load gevent).
"""

from gevent import monkey

monkey.patch_all()

import sys  # noqa: E402

from relay.cli import main  # noqa: E402


def run() -> int:
    """Entry point of the `relay` console script."""
    if sys.argv and sys.argv[0].endswith("__main__.py"):
        sys.argv[0] = "relay"  # `python -m relay`: name the program as the user knows it
    return main()


if __name__ == "__main__":
    raise SystemExit(run())
