"""Named Pusher apps (RELAY_APPS): read, check and reload the TOML file that lists them.

1. `load_apps(path, defaults)` reads one `[apps.NAME]` table per app: `url` (required, the
   PUSHER_URL form) and optionally `rate_limit`, `rate_burst`, `max_data_bytes`, `timeout`
   and `encryption_master_key_base64`, each checked by the matching global setting's own
   parser and defaulting to that setting (`AppDefaults`), so the file says only what differs.
2. Bad input raises `AppsError`, a ConfigError whose one line (the CLI prints it, exit 2)
   names the file, the app and the key. It never holds a secret: values of `url` and of the
   master key are never shown, and TOML's own messages lose what they quote.
3. The app named `default` gets notifications that name none. Without a file,
   `single_app(cfg)` makes PUSHER_URL's app `default`, exactly as before RELAY_APPS. With a
   file, the file is the whole truth: PUSHER_URL is not used.
4. `reload(path, current)` is SIGHUP's: the new Apps, or the AppsError while the caller keeps
   `current`; one log line either way.
5. A file that group or others can read gets a warning naming its mode (once: a reload
   warns again only when the mode changed).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import stat
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from relay import config, rules
from relay.config import Config, ConfigError, PusherTarget
from relay.message import InvalidMessage, Limits

log = logging.getLogger(__name__)

DEFAULT = rules.DEFAULT_APP
SETTING = "RELAY_APPS"
URL_FORM = '"https://KEY:SECRET@HOST[:PORT]/apps/APP_ID"'
# An app's optional key -> the global setting that checks it and that it defaults to.
OPTIONAL_KEYS = {
    "rate_limit": "RELAY_RATE_LIMIT",
    "rate_burst": "RELAY_RATE_BURST",
    "max_data_bytes": "RELAY_MAX_DATA_BYTES",
    "timeout": "PUSHER_TIMEOUT",
    "encryption_master_key_base64": "PUSHER_ENCRYPTION_MASTER_KEY_BASE64",
}
KEYS = ("url", *OPTIONAL_KEYS)
_WHOLE_NUMBERS = ("rate_burst", "max_data_bytes")
_KNOWN_SHOWN = 20  # app names listed in an unknown-app dead letter
_LOOSE_MODE = 0o044  # group- or world-readable


class AppsError(ConfigError):
    """RELAY_APPS cannot be used; the text names the file, the app and the key, no secret."""

    def __init__(self, path: str, problem: str, app: str | None = None,
                 key: str | None = None) -> None:
        where = str(path)
        if app is not None:
            where += f": [apps.{app}]"
        if key is not None:
            where += f" {key}"
        super().__init__(SETTING, f"{where}: {problem}")
        self.path, self.app, self.key = path, app, key


class UnknownApp(InvalidMessage):
    """A notification names an app that RELAY_APPS does not have: a dead letter at once."""

    def __init__(self, app: str | None, known: Iterable[str]) -> None:
        names = sorted(known)
        shown = ", ".join(names[:_KNOWN_SHOWN]) or "none"
        if len(names) > _KNOWN_SHOWN:
            shown += f" and {len(names) - _KNOWN_SHOWN} more"
        if app is None:
            text = (f"no app named {DEFAULT!r} for a notification naming no app "
                    f"(known apps: {shown})")
        else:
            text = f"unknown app {app!r} (known apps: {shown})"
        super().__init__(text)
        self.app = app


@dataclass(frozen=True)
class AppDefaults:
    """The global settings an app inherits for each key its table leaves out."""

    rate_limit: float = 0.0
    rate_burst: int = 0
    max_data_bytes: int = rules.MAX_DATA_BYTES
    timeout: float = 5.0
    encryption_master_key_base64: str | None = field(default=None, repr=False)

    @classmethod
    def from_config(cls, cfg: Config) -> AppDefaults:
        return cls(cfg.rate_limit, cfg.rate_burst, cfg.max_data_bytes, cfg.pusher_timeout,
                   cfg.pusher_encryption_master_key)


@dataclass(frozen=True)
class App:
    """One Pusher app: where and as whom to call (with its timeout and master key), and its
    own rate limit and data limit. Equal only when every setting, secret included, is."""

    name: str
    pusher: PusherTarget
    rate_limit: float = 0.0  # events per second across every worker process (0: off)
    rate_burst: int = 0
    max_data_bytes: int = rules.MAX_DATA_BYTES

    @property
    def timeout(self) -> float:
        return self.pusher.timeout

    @property
    def encryption_master_key_base64(self) -> str | None:
        return self.pusher.encryption_master_key_base64

    @property
    def limits(self) -> Limits:
        """What the parser refuses for this app (relay.message)."""
        return Limits(self.max_data_bytes, encryption=bool(self.encryption_master_key_base64))

    def describe(self) -> str:
        """One app for the start-up and reload log lines; the secret and key masked."""
        target = self.pusher
        return (f"{self.name}={target.base_url}/apps/{target.app_id} key={target.key} "
                f"timeout={target.timeout} rate_limit={self.rate_limit} "
                f"rate_burst={self.rate_burst} max_data_bytes={self.max_data_bytes} "
                f"encryption={'on' if self.encryption_master_key_base64 else 'off'}")


@dataclass(frozen=True)
class AppChanges:
    """What a reload changed, by app name."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)

    def __str__(self) -> str:
        parts = [f"{what} {', '.join(names)}" for what, names in
                 (("added", self.added), ("removed", self.removed), ("changed", self.changed))
                 if names]
        return "; ".join(parts) or "no change"


@dataclass(frozen=True, eq=False)
class Apps:
    """The apps by name, where they came from, and the defaults to reload them with."""

    by_name: Mapping[str, App]
    defaults: AppDefaults = AppDefaults()
    path: str | None = None  # None: PUSHER_URL's single app
    file_mode: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_name", MappingProxyType(dict(self.by_name)))

    def __iter__(self) -> Iterator[App]:
        return iter(self.by_name[name] for name in self.names)

    def __len__(self) -> int:
        return len(self.by_name)

    def __contains__(self, name: object) -> bool:
        return name in self.by_name

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self.by_name))

    @property
    def default(self) -> App | None:
        return self.by_name.get(DEFAULT)

    def get(self, name: str | None) -> App | None:
        """The app a notification names (None: `default`), or None when there is none."""
        return self.by_name.get(DEFAULT if name is None else name)

    def find(self, name: str | None) -> App:
        """Like get(), but an unknown app raises UnknownApp (an InvalidMessage)."""
        app = self.get(name)
        if app is None:
            raise UnknownApp(name, self.by_name)
        return app

    def limits_for(self, name: str | None) -> Limits:
        """relay.message.parse's per-app limits: `parse(raw, event, apps.limits_for)`."""
        return self.find(name).limits

    def changes(self, new: Apps) -> AppChanges:
        old_names, new_names = set(self.by_name), set(new.by_name)
        return AppChanges(
            added=tuple(sorted(new_names - old_names)),
            removed=tuple(sorted(old_names - new_names)),
            changed=tuple(sorted(n for n in old_names & new_names
                                 if self.by_name[n] != new.by_name[n])))

    def describe(self) -> str:
        source = self.path if self.path is not None else "PUSHER_URL"
        return f"{len(self)} app(s) from {source}: " + "; ".join(a.describe() for a in self)


# -- building --------------------------------------------------------------------------------


def single_app(cfg: Config) -> Apps:
    """Without RELAY_APPS: PUSHER_URL's app (and the global settings) is `default`."""
    if cfg.pusher is None:
        raise ConfigError("PUSHER_URL", "is not set (set PUSHER_URL, or RELAY_APPS)")
    app = App(DEFAULT, cfg.pusher, cfg.rate_limit, cfg.rate_burst, cfg.max_data_bytes)
    return Apps({DEFAULT: app}, AppDefaults.from_config(cfg))


def from_config(cfg: Config) -> Apps:
    """The apps at start: the RELAY_APPS file when set, else PUSHER_URL's single app."""
    if cfg.apps_file:
        return load_apps(cfg.apps_file, AppDefaults.from_config(cfg))
    return single_app(cfg)


def load_apps(path: str, defaults: AppDefaults = AppDefaults()) -> Apps:
    """Read and check the RELAY_APPS file; AppsError names what is wrong."""
    return _load(path, defaults, previous=None)


def reload(path: str | None, current: Apps) -> Apps | AppsError:
    """SIGHUP: the file read anew, or its AppsError while the caller keeps `current`.

    Logs one line either way. Without RELAY_APPS (path None) there is nothing to reload.
    """
    if path is None:
        log.info("SIGHUP: RELAY_APPS is not set, nothing to reload")
        return current
    try:
        new = _load(path, current.defaults, previous=current)
    except AppsError as exc:
        log.error("RELAY_APPS not reloaded, keeping the %d app(s) loaded before: %s",
                  len(current), exc)
        return exc
    log.info("RELAY_APPS reloaded from %s: %d app(s) (%s)", path, len(new),
             current.changes(new))
    return new


def _load(path: str, defaults: AppDefaults, previous: Apps | None) -> Apps:
    data, mode = _read(path)
    tables = _tables(path, _toml(path, data))
    apps = Apps({name: _app(path, name, table, defaults) for name, table in tables.items()},
                defaults, str(path), mode)
    if mode & _LOOSE_MODE and (previous is None or previous.file_mode != mode):
        log.warning("RELAY_APPS file %s has mode %04o: group or others can read the Pusher "
                    "secrets in it (chmod 600 it)", path, mode)
    if apps.default is None and (previous is None or previous.default is not None):
        log.warning("RELAY_APPS file %s has no [apps.%s]: notifications naming no app "
                    "(every classic message) will be dead-lettered", path, DEFAULT)
    return apps


def _read(path: str) -> tuple[bytes, int]:
    """The file's bytes and permission bits, both from the one open file."""
    try:
        with open(path, "rb") as file:
            info = os.fstat(file.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise AppsError(path, "is not a regular file")
            return file.read(), stat.S_IMODE(info.st_mode)
    except OSError as exc:
        raise AppsError(path, f"cannot be read: {exc.strerror or exc}") from None


# -- TOML ------------------------------------------------------------------------------------

_AT = re.compile(r"\(at line (\d+), column (\d+)\)")
_TWICE = re.compile(r"Cannot declare \('apps', '([A-Za-z0-9_-]+)'\) twice")
_HEADER = re.compile(r"^\s*\[\[?\s*([^\]\n]*?)\s*\]")
_APP_HEADER = re.compile(r"""apps\s*\.\s*(["']?)([A-Za-z0-9_-]+)\1""")


def _toml(path: str, data: bytes) -> dict[str, Any]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise AppsError(path, "is not UTF-8 text") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _toml_error(path, text, str(exc)) from None


def _toml_error(path: str, text: str, message: str) -> AppsError:
    """TOML's complaint, minus anything it quotes from the file, with the app it is in."""
    at = _AT.search(message)
    line = int(at.group(1)) if at else len(text.splitlines())  # else: at the end
    where = f" (line {line}, column {at.group(2)})" if at else " (at the end of the file)"
    twice = _TWICE.search(message)
    if twice:
        name = twice.group(1)
        lines = [n for n, header in _headers(text) if header == name]
        where = (f"lines {' and '.join(str(n) for n in lines)}" if len(lines) > 1
                 else f"line {line}")
        return AppsError(path, f"the app is declared twice ({where}); app names must be "
                               "unique", app=name)
    head = re.split(r"""['"(]""", message, maxsplit=1)[0].strip()
    return AppsError(path, f"not valid TOML: {head}{where}", app=_app_at(text, line))


def _headers(text: str) -> Iterator[tuple[int, str | None]]:
    """(line number, the app's name or None) of each table header."""
    for number, line in enumerate(text.splitlines(), 1):
        header = _HEADER.match(line)
        if header:
            app = _APP_HEADER.fullmatch(header.group(1))
            yield number, app.group(2) if app else None


def _app_at(text: str, line: int) -> str | None:
    """The app whose table holds `line`, if it is in one."""
    found = None
    for number, name in _headers(text):
        if number > line:
            break
        found = name
    return found


# -- checking --------------------------------------------------------------------------------


def _shown(name: str) -> str:
    """A name from the file as a message may show it: short, quoted, no URL credentials."""
    return re.sub(r"//[^/@\s]*@", "//***@", repr(name[:64]))


def _quoted(name: str) -> str:
    """A bad app name as TOML would quote it in `[apps."..."]`, shown like _shown."""
    return re.sub(r"//[^/@\s]*@", "//***@", json.dumps(name[:64], ensure_ascii=False))


def _tables(path: str, doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    for key in doc:
        if key != "apps":
            raise AppsError(path, f"{_shown(key)} is not allowed at the top level: the file "
                                  "holds [apps.NAME] tables only")
    apps = doc.get("apps")
    if not isinstance(apps, dict) or not apps:
        raise AppsError(path, "has no app: add an [apps.NAME] table with url = " + URL_FORM)
    for name, table in apps.items():
        if rules.app_problem(name) is not None:
            raise AppsError(path, f"an app name is 1 to {rules.MAX_APP_NAME} letters, digits, "
                                  "'_' or '-'", app=_quoted(name))
        if not isinstance(table, dict):
            raise AppsError(path, "must be a table: [apps.NAME] followed by its keys",
                            app=name)
    return apps


def _app(path: str, name: str, table: dict[str, Any], defaults: AppDefaults) -> App:
    for key, value in table.items():
        if key not in KEYS:
            hint = " (a table: an app name cannot hold a dot)" if isinstance(value, dict) else ""
            raise AppsError(path, f"unknown key{hint}; an app takes {', '.join(KEYS)}",
                            app=name, key=_shown(key))
    if "url" not in table:
        raise AppsError(path, "missing: every app needs url = " + URL_FORM, app=name,
                        key="url")
    given = {key: _value(path, name, key, table[key]) for key in OPTIONAL_KEYS if key in table}
    merged = {key: given.get(key, getattr(defaults, key)) for key in OPTIONAL_KEYS}
    if "rate_burst" not in given and "rate_limit" in given:
        merged["rate_burst"] = config.default_burst(given["rate_limit"])
    target = _target(path, name, table["url"], merged["timeout"])
    return App(name, replace(target, encryption_master_key_base64=(
                   merged["encryption_master_key_base64"])),
               merged["rate_limit"], merged["rate_burst"], merged["max_data_bytes"])


def _target(path: str, name: str, url: Any, timeout: float) -> PusherTarget:
    if not isinstance(url, str):
        raise AppsError(path, "must be a string: " + URL_FORM, app=name, key="url")
    try:
        return config.parse_pusher_url(url, timeout)
    except ConfigError as exc:  # its text never quotes the credentials
        raise AppsError(path, exc.problem, app=name, key="url") from None


def _value(path: str, name: str, key: str, value: Any) -> Any:
    """One optional key, checked by its global setting's parser."""
    if key == "encryption_master_key_base64":
        if not isinstance(value, str):
            raise AppsError(path, "must be a string (base64 of 32 bytes)", app=name, key=key)
        if not value.strip():
            return None  # "": no encryption for this app, whatever the global setting says
        text = value
    else:
        text = _number_text(path, name, key, value)
    try:
        return config.parse_setting(OPTIONAL_KEYS[key], text)
    except ConfigError as exc:
        raise AppsError(path, exc.problem, app=name, key=key) from None


def _number_text(path: str, name: str, key: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AppsError(path, f"must be a number, not {_toml_type(value)}", app=name, key=key)
    if isinstance(value, float) and not math.isfinite(value):
        raise AppsError(path, f"must be a finite number (got {value})", app=name, key=key)
    if key in _WHOLE_NUMBERS and not isinstance(value, int):
        raise AppsError(path, f"must be a whole number (got {value})", app=name, key=key)
    return str(value)


def _toml_type(value: Any) -> str:
    names = {bool: "a boolean", str: "a string", list: "an array", dict: "a table"}
    return next((n for t, n in names.items() if isinstance(value, t)), "a date or time")
