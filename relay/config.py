"""Settings: one frozen object built once from the environment and the command line.

1. `SETTINGS` is the single table of every setting: its environment variable, its flag,
   its default and how to parse it, so `--help`, the README and the parser cannot drift.
2. `load()` merges flags over the environment, validates everything, and raises
   `ConfigError` naming the setting at fault (the CLI turns that into exit status 2).
3. Secrets (the Pusher secret, passwords in URLs) are masked in `repr` and in
   `Config.describe()`, the text of the start-up log line.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any
from urllib.parse import SplitResult, unquote, urlsplit

from relay import redis_url, rules
from relay.errors import RelayError
from relay.message import Limits

PUSHER_DEFAULT_HOST = "api-{cluster}.pusher.com"


class ConfigError(RelayError, ValueError):
    """A setting is missing or malformed; the message names it and never holds a secret."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"{setting}: {problem}")
        self.setting = setting
        self.problem = problem


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be 1 or more")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("must be 0 or more")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also rejects NaN
        raise ValueError("must be 0 or more")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError("must be more than 0")
    return value


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        lowered = text.strip().lower()
        if lowered not in allowed:
            raise ValueError("must be one of " + ", ".join(allowed))
        return lowered

    return parse


def _text(text: str) -> str:
    return text


def _data_limit(text: str) -> int:
    """The producer's rule too (relay.rules), so both refuse the same limits."""
    value = int(text)
    problem = rules.data_limit_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


def _master_key(text: str) -> str:
    """The pusher library's rule: base64 that decodes to 32 bytes. Checked here, at start."""
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("must be base64") from None
    if len(key) != 32:
        raise ValueError("must be base64 of 32 bytes (openssl rand -base64 32)")
    return text.strip()


def _port(text: str) -> int:
    value = int(text)
    if not 0 < value < 65536:
        raise ValueError("must be a TCP port, 1 to 65535")
    return value


def _metrics_addr(text: str) -> str:
    if text.strip().lower() == "off":
        return "off"
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError("must be HOST:PORT or off")
    if not 0 <= int(port) <= 65535:  # 0 is allowed: the OS picks a free port (tests use it)
        raise ValueError("port must be 0 to 65535")
    return text


def _dashboard_addr(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError("must be HOST:PORT")
    if not 0 <= int(port) <= 65535:  # 0: the OS picks a free port (tests use it)
        raise ValueError("port must be 0 to 65535")
    return text


def _user_password(text: str) -> str:
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ValueError("must be user:password")
    return text


@dataclass(frozen=True)
class Setting:
    """One user-facing setting: environment variable, flag, default, parser, meaning."""

    env: str
    attr: str
    default: str | None
    parse: Callable[[str], Any]
    help: str
    secret: bool = False

    @property
    def flag(self) -> str:
        name = self.env.removeprefix("RELAY_").lower().replace("_", "-")
        return "--" + name


SETTINGS: tuple[Setting, ...] = (
    Setting("REDIS_URL", "redis_url", "redis://localhost:6379/0", _text,
            "redis://, rediss:// (TLS), unix://, redis+sentinel:// or redis+cluster:// "
            "URL", secret=True),
    Setting("RELAY_QUEUE", "queue", "notifications", _text,
            "the list to consume; every other key the worker keeps starts with it"),
    Setting("PUSHER_URL", "pusher_url", None, _text,
            "https://KEY:SECRET@HOST[:PORT]/apps/APP_ID", secret=True),
    Setting("PUSHER_APP_ID", "pusher_app_id", None, _text, "alternative to PUSHER_URL"),
    Setting("PUSHER_KEY", "pusher_key", None, _text, "alternative to PUSHER_URL"),
    Setting("PUSHER_SECRET", "pusher_secret", None, _text, "alternative to PUSHER_URL",
            secret=True),
    Setting("PUSHER_CLUSTER", "pusher_cluster", "mt1", _text,
            "Pusher cluster, used when no host is given"),
    Setting("PUSHER_HOST", "pusher_host", None, _text,
            "API host for self-hosted servers (default: Pusher's for the cluster)"),
    Setting("PUSHER_PORT", "pusher_port", None, _port, "API port (default 443, or 80 without SSL)"),
    Setting("PUSHER_SSL", "pusher_ssl", "true", _bool, "use HTTPS"),
    Setting("PUSHER_TIMEOUT", "pusher_timeout", "5", _positive_float,
            "seconds per HTTP call (connect and read)"),
    Setting("PUSHER_HTTP_CLIENT", "http_client", "geventhttpclient",
            _choice("geventhttpclient", "urllib3", "requests"),
            "transport under the pusher library: geventhttpclient (least CPU), urllib3 or "
            "requests"),
    Setting("PUSHER_ENCRYPTION_MASTER_KEY_BASE64", "pusher_encryption_master_key", None,
            _master_key, "32 random bytes, base64: enables end-to-end encrypted channels "
            "(private-encrypted-*)", secret=True),
    Setting("RELAY_MAX_DATA_BYTES", "max_data_bytes", "10240", _data_limit,
            "largest event data in bytes (Pusher's limit; self-hosted servers may allow more)"),
    Setting("RELAY_EVENT", "event", "hit", _text, "event name for classic messages"),
    Setting("RELAY_POOL_SIZE", "pool_size", "50", _positive_int,
            "greenlets: the cap on concurrent Pusher calls"),
    Setting("RELAY_PREFETCH", "prefetch", "1000", _positive_int,
            "the most notifications one worker process holds taken and not yet settled (its "
            "window; also what a kill -9 may send twice)"),
    Setting("RELAY_RATE_LIMIT", "rate_limit", "0", _non_negative_float,
            "events per second shared by every worker on the queue (0 = off)"),
    Setting("RELAY_RATE_BURST", "rate_burst", None, _non_negative_int,
            "events allowed above the rate in one burst (default: the limit)"),
    Setting("RELAY_MAX_ATTEMPTS", "max_attempts", "10", _positive_int,
            "attempts before a transiently failing notification is dead-lettered"),
    Setting("RELAY_RETRY_FOR", "retry_for", "3600", _non_negative_float,
            "seconds of retrying before a notification is dead-lettered"),
    Setting("RELAY_MAX_BACKLOG", "max_backlog", "0", _non_negative_int,
            "when the list is longer, the oldest excess is dropped (0 = off)"),
    Setting("RELAY_MAX_AGE", "max_age", "0", _non_negative_float,
            "seconds; older envelopes are dropped as stale (0 = off)"),
    Setting("RELAY_ORDER", "order", "fifo", _choice("fifo", "lifo"),
            "fifo, or lifo to deliver the newest first"),
    Setting("RELAY_CHANNEL_ORDER", "channel_order", "true", _bool,
            "a channel's notifications reach Pusher in the order they were taken; false "
            "sends without regard to it (faster on a few busy channels, unordered)"),
    Setting("RELAY_LINGER", "linger", "0", _non_negative_float,
            "seconds a notification that ends a quiet spell waits for others to share its "
            "call (0 = off: it goes at once); fewer calls and round trips at moderate rates, "
            "for that much latency"),
    Setting("RELAY_APPS", "apps_file", None, _text,
            "path to a TOML file of named apps ([apps.NAME] with url, and optionally "
            "rate_limit, rate_burst, max_data_bytes, timeout, encryption_master_key_base64); "
            "`default` gets notifications naming no app (default: PUSHER_URL is `default`)"),
    Setting("RELAY_METRICS_ADDR", "metrics_addr", "127.0.0.1:9300", _metrics_addr,
            "HOST:PORT for /metrics and /healthz, or off"),
    Setting("RELAY_LOG_LEVEL", "log_level", "info",
            _choice("debug", "info", "warning", "error"), "log level"),
    Setting("RELAY_LOG_FORMAT", "log_format", "text", _choice("text", "json"),
            "text, or json for one JSON object per line"),
    Setting("RELAY_HEARTBEAT_TTL", "heartbeat_ttl", "10", _positive_float,
            "seconds without a heartbeat after which a worker's in-flight items are recovered"),
    Setting("RELAY_DASHBOARD_ADDR", "dashboard_addr", "127.0.0.1:9400", _dashboard_addr,
            "HOST:PORT where `dashboard` serves the operator's page"),
    Setting("RELAY_DASHBOARD_AUTH", "dashboard_auth", None, _user_password,
            "user:password for HTTP basic auth on the page; required when the address is "
            "not loopback", secret=True),
)


@dataclass(frozen=True)
class PusherTarget:
    """Where and as whom to call the Pusher HTTP API."""

    app_id: str
    key: str
    secret: str = field(repr=False)
    host: str
    port: int
    ssl: bool
    timeout: float
    encryption_master_key_base64: str | None = field(default=None, repr=False)

    @property
    def base_url(self) -> str:
        scheme = "https" if self.ssl else "http"
        return f"{scheme}://{self.host}:{self.port}"


@dataclass(frozen=True)
class Config:
    """The validated settings; secrets never appear in repr()."""

    redis_url: str = field(repr=False)
    queue: str
    pusher: PusherTarget | None
    http_client: str
    event: str
    pool_size: int
    rate_limit: float
    rate_burst: int
    max_attempts: int
    retry_for: float
    max_backlog: int
    max_age: float
    order: str
    channel_order: bool
    metrics_addr: str
    log_level: str
    log_format: str
    heartbeat_ttl: float
    max_data_bytes: int = 10240
    linger: float = 0.0
    prefetch: int = 1000

    @property
    def limits(self) -> Limits:
        """What the parser refuses before sending: the data limit, and encrypted channels
        unless a master key is set."""
        encryption = self.pusher is not None and self.pusher.encryption_master_key_base64
        return Limits(self.max_data_bytes, encryption=bool(encryption))
    dashboard_addr: str = "127.0.0.1:9400"
    dashboard_auth: str | None = field(default=None, repr=False)
    apps_file: str | None = None  # RELAY_APPS; relay.apps reads it
    # The global PUSHER_TIMEOUT and key, kept apart from `pusher`: an app of RELAY_APPS
    # inherits them, and with RELAY_APPS there may be no PUSHER_URL.
    pusher_timeout: float = 5.0
    pusher_encryption_master_key: str | None = field(default=None, repr=False)

    def describe(self) -> str:
        """The effective configuration for the start-up log line, secrets masked."""
        parts = [f"redis={redis_url.mask(self.redis_url)}"]
        if self.pusher is not None:
            parts.append(f"pusher={self.pusher.base_url}/apps/{self.pusher.app_id}")
            parts.append(f"key={self.pusher.key} secret=*** timeout={self.pusher.timeout}")
        for f in fields(self):
            if f.name in ("dashboard_auth", "pusher_encryption_master_key"):
                parts.append(f"{f.name}={'***' if getattr(self, f.name) else None}")
            elif f.name not in ("redis_url", "pusher"):
                parts.append(f"{f.name}={getattr(self, f.name)}")
        return " ".join(parts)


def mask_url(url: str) -> str:
    """Hide the password (or a lone user token) of a URL; the rest stays readable."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    if parts.password is None and parts.username is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return parts._replace(netloc=f"***@{host}").geturl()


_URL_PATH = re.compile(r"\A/apps/([0-9]+)/?\Z")
_URL_APP = re.compile(r"\A/apps/([^/]+)/?\Z")


def parse_pusher_url(url: str, timeout: float) -> PusherTarget:
    """Parse PUSHER_URL ourselves: pusher 3.3.4's from_url keeps the port in the host."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        raise ConfigError("PUSHER_URL", "is not a valid URL") from None
    if parts.scheme not in ("http", "https"):
        raise ConfigError("PUSHER_URL", "must start with https:// or http://")
    if not parts.username or not parts.password:
        raise ConfigError("PUSHER_URL", "must carry KEY:SECRET@ before the host")
    if not parts.hostname:
        raise ConfigError("PUSHER_URL", "has no host after KEY:SECRET@")
    return _with_app_id(parts, port, timeout)


def _app_id_of(path: str) -> str:
    """The numeric id in `/apps/ID`; one trailing slash is accepted, as browsers add one."""
    match = _URL_PATH.match(path)
    if match:
        return match.group(1)
    app = _URL_APP.match(path)
    if app:
        raise ConfigError("PUSHER_URL", f"has app id {app.group(1)[:40]!r} after /apps/, but "
                                        "Pusher app ids are numeric (e.g. /apps/123456)")
    raise ConfigError("PUSHER_URL", "must end with /apps/APP_ID, the numeric app id "
                                    f"(its path is {path[:60]!r})")


def _with_app_id(parts: SplitResult, port: int | None, timeout: float) -> PusherTarget:
    app_id = _app_id_of(parts.path)
    ssl = parts.scheme == "https"
    return PusherTarget(
        app_id=app_id,
        key=unquote(parts.username),
        secret=unquote(parts.password),
        host=parts.hostname,
        port=port or (443 if ssl else 80),
        ssl=ssl,
        timeout=timeout,
    )


def _pusher_target(raw: Mapping[str, Any]) -> PusherTarget:
    timeout = raw["pusher_timeout"]
    if raw["pusher_url"]:
        target = parse_pusher_url(raw["pusher_url"], timeout)
        return replace(target, encryption_master_key_base64=raw["pusher_encryption_master_key"])
    for attr, env in (("pusher_app_id", "PUSHER_APP_ID"), ("pusher_key", "PUSHER_KEY"),
                      ("pusher_secret", "PUSHER_SECRET")):
        if not raw[attr]:
            raise ConfigError(env, "is not set (set PUSHER_URL, or PUSHER_APP_ID, PUSHER_KEY "
                                   "and PUSHER_SECRET)")
    if not re.fullmatch(r"[0-9]+", raw["pusher_app_id"]):
        raise ConfigError("PUSHER_APP_ID", "must be a number")
    ssl = raw["pusher_ssl"]
    host = raw["pusher_host"] or PUSHER_DEFAULT_HOST.format(cluster=raw["pusher_cluster"])
    return PusherTarget(
        app_id=raw["pusher_app_id"],
        key=raw["pusher_key"],
        secret=raw["pusher_secret"],
        host=host,
        port=raw["pusher_port"] or (443 if ssl else 80),
        ssl=ssl,
        timeout=timeout,
        encryption_master_key_base64=raw["pusher_encryption_master_key"],
    )


def default_burst(rate_limit: float) -> int:
    """RELAY_RATE_BURST when unset (and an app's rate_burst): one second's worth, rounded up."""
    return int(rate_limit + 0.999999)


def _check_redis_url(url: str) -> None:
    try:
        redis_url.parse(url)
    except redis_url.RedisUrlError as exc:  # its text never quotes the URL
        raise ConfigError("REDIS_URL", str(exc)) from None


def _parse_one(setting: Setting, text: str | None) -> Any:
    if text is None:
        return None
    try:
        return setting.parse(text)
    except ValueError as exc:
        shown = "***" if setting.secret else repr(text)
        reason = str(exc) if "invalid literal" not in str(exc) else "must be a number"
        raise ConfigError(setting.env, f"{reason} (got {shown})") from None


def parse_setting(env: str, text: str) -> Any:
    """`text` parsed as the setting `env` is: its parser, its ConfigError (relay.apps checks
    an app's keys with the matching global settings' rules)."""
    setting = next(s for s in SETTINGS if s.env == env)
    return _parse_one(setting, text)


def add_arguments(parser: argparse.ArgumentParser, suppress: bool = False,
                  skip: frozenset[str] = frozenset()) -> None:
    """Give every setting its flag; a flag left out falls back to the environment.

    suppress=True is for subcommands: their unset flags must not overwrite the ones given
    before the subcommand name.
    """
    group = parser.add_argument_group("settings (each also an environment variable)")
    for s in SETTINGS:
        if s.env in skip:
            continue
        default = f"default: {s.default}" if s.default is not None else "no default"
        group.add_argument(s.flag, dest=s.attr, default=argparse.SUPPRESS if suppress else None,
                           metavar=s.env, help=f"{s.help} [{s.env}; {default}]")


def load(env: Mapping[str, str] | None = None, args: argparse.Namespace | None = None,
         need_pusher: bool = True) -> Config:
    """Build the Config from flags over environment over defaults; raise ConfigError.

    The admin commands pass need_pusher=False: they only touch Redis, and `pusher` is None.
    """
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    for s in SETTINGS:
        flag_value = getattr(args, s.attr, None) if args is not None else None
        text = flag_value if flag_value is not None else env.get(s.env)
        if text is not None and text.strip() == "" and not s.secret:
            text = None  # an empty variable means "not set", as shells and supervisord write it
        raw[s.attr] = _parse_one(s, text if text is not None else s.default)
    _check_redis_url(raw["redis_url"])
    if not raw["queue"] or any(c.isspace() for c in raw["queue"]):
        raise ConfigError("RELAY_QUEUE", "must be a non-empty name without spaces")
    burst = raw["rate_burst"]
    if burst is None:
        burst = default_burst(raw["rate_limit"])
    # With RELAY_APPS the file names every app (relay.apps) and PUSHER_URL is not read.
    pusher = _pusher_target(raw) if need_pusher and not raw["apps_file"] else None
    values = {k: v for k, v in raw.items() if not k.startswith("pusher_")}
    values.update(pusher=pusher, rate_burst=burst, pusher_timeout=raw["pusher_timeout"],
                  pusher_encryption_master_key=raw["pusher_encryption_master_key"])
    return Config(**values)
