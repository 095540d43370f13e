"""Command line: `python worker.py [settings]` runs the worker; subcommands administer.

Bad configuration ends the process at start with one line naming the setting, status 2.
Settings flags go before or after a subcommand name; each is also an environment variable.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Sequence
from typing import NoReturn

from relay import __version__, admin, apps, config, launcher, logs

log = logging.getLogger(__name__)

EXIT_CONFIG = 2


class Parser(argparse.ArgumentParser):
    """argparse echoes unknown arguments; a mistyped --pusher-url would print its secret."""

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments:"):
            words = message.split(":", 1)[1].split()
            flags = [w.split("=", 1)[0] for w in words if w.startswith("-")]
            message = ("unrecognized arguments: " + " ".join(flags)
                       + " (values not shown: they may hold secrets)")
        elif "invalid choice:" in message:
            message = message.split("invalid choice:", 1)[0] + "invalid choice (not shown)"
        super().error(re.sub(r"//[^/@\s]+@", "//***@", message))


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        # argv[0]'s name: `worker.py` or `relay` (the console script), whichever was run
        description="relay: move notifications from a Redis list to the Pusher HTTP API.\n"
                    "Without a subcommand it runs the worker.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"relay {__version__}")
    config.add_arguments(parser)
    parser.add_argument("--burst", action="store_true",
                        help="drain the queue and the retries due now, then exit 0 "
                             "(for cron jobs and one-shot drains)")
    settings = argparse.ArgumentParser(add_help=False)
    config.add_arguments(settings, suppress=True)
    settings_no_event = argparse.ArgumentParser(add_help=False)
    config.add_arguments(settings_no_event, suppress=True, skip=frozenset({"RELAY_EVENT"}))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", parents=[settings], help="run the worker (the default)")
    run.add_argument("--burst", action="store_true", default=argparse.SUPPRESS,
                     help="drain, then exit 0")
    admin.add_subcommands(sub, [settings], [settings_no_event])
    return parser


def load_config(args: argparse.Namespace, need_pusher: bool = True) -> config.Config | None:
    try:
        return config.load(args=args, need_pusher=need_pusher)
    except config.ConfigError as exc:
        sys.stderr.write(f"relay: bad configuration: {exc}\n")
        return None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problem = admin.usage_problem(args)
    if problem is not None:
        sys.stderr.write(f"relay: {problem}\n")
        return EXIT_CONFIG
    command = args.command or "run"
    cfg = load_config(args, need_pusher=command == "run")
    if cfg is None:
        return EXIT_CONFIG
    logs.setup(cfg.log_level, cfg.log_format)
    if command == "run":
        try:
            found = apps.from_config(cfg)
        except config.ConfigError as exc:  # a bad RELAY_APPS file: nothing has started
            sys.stderr.write(f"relay: bad configuration: {exc}\n")
            return EXIT_CONFIG
        return launcher.run(cfg, found, burst=bool(getattr(args, "burst", False)))
    return launcher.run_admin(command, args, cfg)
