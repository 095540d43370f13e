"""Entry point: `python worker.py --help`.

gevent must patch the standard library before anything else imports socket or ssl,
so this file does that first and nothing else.
"""

from gevent import monkey

monkey.patch_all()

from relay.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
