"""relay.config: defaults, env and flags, Pusher URL parsing, errors, and secret hygiene."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from relay.cli import build_parser
from relay.config import SETTINGS, Config, ConfigError, load, parse_pusher_url
from relay.redis_server import RedisServer
from tests.support import ROOT

SECRET = "Zq9sEcReT-do-not-leak-7731"
CREDS = {"PUSHER_APP_ID": "42", "PUSHER_KEY": "the-key", "PUSHER_SECRET": SECRET}
URL = f"https://the-key:{SECRET}@api.example.com/apps/42"


def flags(*argv: str) -> Any:
    return build_parser().parse_args(list(argv))


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        assert SECRET not in text, text


# -- defaults ----------------------------------------------------------------------------------


def test_defaults_match_the_contract() -> None:
    cfg = load(env=dict(CREDS))
    assert cfg.redis_url == "redis://localhost:6379/0"
    assert cfg.queue == "notifications"
    assert cfg.event == "hit"
    assert cfg.pool_size == 50
    assert cfg.rate_limit == 0
    assert cfg.rate_burst == 0
    assert cfg.max_attempts == 10
    assert cfg.retry_for == 3600
    assert cfg.max_backlog == 0
    assert cfg.max_age == 0
    assert cfg.order == "fifo"
    assert cfg.channel_order is True
    assert cfg.metrics_addr == "127.0.0.1:9300"
    assert cfg.log_level == "info"
    assert cfg.log_format == "text"
    p = cfg.pusher
    assert (p.app_id, p.key, p.secret) == ("42", "the-key", SECRET)
    assert (p.host, p.port, p.ssl, p.timeout) == ("api-mt1.pusher.com", 443, True, 5.0)


def test_load_reads_os_environ_when_no_env_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("RELAY_", "PUSHER_", "REDIS_")):
            monkeypatch.delenv(name)
    for name, value in CREDS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("RELAY_POOL_SIZE", "3")
    assert load().pool_size == 3


def test_rate_burst_defaults_to_the_limit_rounded_up() -> None:
    assert load(env={**CREDS, "RELAY_RATE_LIMIT": "20"}).rate_burst == 20
    assert load(env={**CREDS, "RELAY_RATE_LIMIT": "2.5"}).rate_burst == 3
    assert load(env={**CREDS, "RELAY_RATE_LIMIT": "20", "RELAY_RATE_BURST": "5"}).rate_burst == 5


@pytest.mark.parametrize("url", ["redis://localhost", "rediss://:pw@cache.example:6380/2",
                                 "unix:///run/redis.sock?db=3", "redis://h/0?socket_timeout=2"])
def test_valid_redis_urls(url: str) -> None:
    assert load(env={**CREDS, "REDIS_URL": url}).redis_url == url


def test_empty_variable_means_unset() -> None:
    cfg = load(env={**CREDS, "RELAY_POOL_SIZE": "", "RELAY_QUEUE": "  "})
    assert (cfg.pool_size, cfg.queue) == (50, "notifications")


# -- every setting by env and by flag ----------------------------------------------------------

Getter = Callable[[Config], Any]

# (env var, flag, value A, value B, read it back, expected for A, expected for B)
KEY_A = base64.b64encode(b"a" * 32).decode()
KEY_B = base64.b64encode(b"b" * 32).decode()
CASES: list[tuple[str, str, str, str, Getter, Any, Any]] = [
    ("REDIS_URL", "--redis-url", "redis://a:1/1", "rediss://b:2/2",
     lambda c: c.redis_url, "redis://a:1/1", "rediss://b:2/2"),
    ("RELAY_QUEUE", "--queue", "alpha", "{beta}", lambda c: c.queue, "alpha", "{beta}"),
    ("PUSHER_CLUSTER", "--pusher-cluster", "eu", "ap2",
     lambda c: c.pusher.host, "api-eu.pusher.com", "api-ap2.pusher.com"),
    ("PUSHER_HOST", "--pusher-host", "a.example", "b.example",
     lambda c: c.pusher.host, "a.example", "b.example"),
    ("PUSHER_PORT", "--pusher-port", "6001", "8443", lambda c: c.pusher.port, 6001, 8443),
    ("PUSHER_SSL", "--pusher-ssl", "false", "yes",
     lambda c: (c.pusher.ssl, c.pusher.port), (False, 80), (True, 443)),
    ("PUSHER_TIMEOUT", "--pusher-timeout", "2.5", "7", lambda c: c.pusher.timeout, 2.5, 7.0),
    ("RELAY_EVENT", "--event", "ping", "pong", lambda c: c.event, "ping", "pong"),
    ("PUSHER_HTTP_CLIENT", "--pusher-http-client", "requests", "URLLIB3",
     lambda c: c.http_client, "requests", "urllib3"),
    ("RELAY_POOL_SIZE", "--pool-size", "3", "200", lambda c: c.pool_size, 3, 200),
    ("RELAY_MAX_DATA_BYTES", "--max-data-bytes", "1", "102400", lambda c: c.max_data_bytes,
     1, 102400),
    ("PUSHER_ENCRYPTION_MASTER_KEY_BASE64", "--pusher-encryption-master-key-base64", KEY_A,
     KEY_B, lambda c: (c.pusher.encryption_master_key_base64, c.limits.encryption),
     (KEY_A, True), (KEY_B, True)),
    ("RELAY_RATE_LIMIT", "--rate-limit", "10", "0.5", lambda c: c.rate_limit, 10.0, 0.5),
    ("RELAY_RATE_BURST", "--rate-burst", "4", "0", lambda c: c.rate_burst, 4, 0),
    ("RELAY_MAX_ATTEMPTS", "--max-attempts", "1", "99", lambda c: c.max_attempts, 1, 99),
    ("RELAY_RETRY_FOR", "--retry-for", "60", "0", lambda c: c.retry_for, 60.0, 0.0),
    ("RELAY_MAX_BACKLOG", "--max-backlog", "1000", "5", lambda c: c.max_backlog, 1000, 5),
    ("RELAY_MAX_AGE", "--max-age", "30", "0.5", lambda c: c.max_age, 30.0, 0.5),
    ("RELAY_ORDER", "--order", "lifo", "FIFO", lambda c: c.order, "lifo", "fifo"),
    ("RELAY_CHANNEL_ORDER", "--channel-order", "false", "on", lambda c: c.channel_order,
     False, True),
    ("RELAY_METRICS_ADDR", "--metrics-addr", "0.0.0.0:9400", "off",
     lambda c: c.metrics_addr, "0.0.0.0:9400", "off"),
    ("RELAY_LOG_LEVEL", "--log-level", "debug", "ERROR", lambda c: c.log_level, "debug", "error"),
    ("RELAY_LOG_FORMAT", "--log-format", "json", "text", lambda c: c.log_format, "json", "text"),
    ("RELAY_HEARTBEAT_TTL", "--heartbeat-ttl", "2", "30", lambda c: c.heartbeat_ttl, 2.0, 30.0),
    ("RELAY_LINGER", "--linger", "0.005", "0", lambda c: c.linger, 0.005, 0.0),
    ("RELAY_PREFETCH", "--prefetch", "500", "1", lambda c: c.prefetch, 500, 1),
    ("RELAY_DASHBOARD_ADDR", "--dashboard-addr", "0.0.0.0:8080", "[::1]:9400",
     lambda c: c.dashboard_addr, "0.0.0.0:8080", "[::1]:9400"),
    ("RELAY_DASHBOARD_AUTH", "--dashboard-auth", "ops:pw", "a:b:c",
     lambda c: c.dashboard_auth, "ops:pw", "a:b:c"),
    ("RELAY_APPS", "--apps", "/etc/relay/apps.toml", "apps.toml", lambda c: c.apps_file,
     "/etc/relay/apps.toml", "apps.toml"),
]


def test_every_setting_has_a_case_here() -> None:
    covered = {case[0] for case in CASES} | {"PUSHER_URL", *CREDS}
    assert covered == {s.env for s in SETTINGS}
    assert {s.env: s.flag for s in SETTINGS if s.env in {c[0] for c in CASES}} == {
        c[0]: c[1] for c in CASES}


@pytest.mark.parametrize("env_name,flag,a,b,get,want_a,want_b", CASES, ids=[c[0] for c in CASES])
def test_env_and_flag_and_flag_beats_env(env_name: str, flag: str, a: str, b: str, get: Getter,
                                         want_a: Any, want_b: Any) -> None:
    assert get(load(env={**CREDS, env_name: a})) == want_a
    assert get(load(env=dict(CREDS), args=flags(f"{flag}={a}"))) == want_a
    assert get(load(env={**CREDS, env_name: a}, args=flags(flag, b))) == want_b
    assert get(load(env={**CREDS, env_name: b}, args=flags(flag, a))) == want_a


def test_pusher_credentials_by_flag_beat_env() -> None:
    env = {"PUSHER_APP_ID": "1", "PUSHER_KEY": "env-key", "PUSHER_SECRET": "env-secret"}
    args = flags("--pusher-app-id", "7", "--pusher-key", "flag-key", "--pusher-secret", SECRET)
    p = load(env=env, args=args).pusher
    assert (p.app_id, p.key, p.secret) == ("7", "flag-key", SECRET)


def test_pusher_url_by_env_and_by_flag() -> None:
    other = "http://k2:s2@127.0.0.1:8301/apps/9"
    assert load(env={"PUSHER_URL": URL}).pusher.host == "api.example.com"
    assert load(env={}, args=flags("--pusher-url", other)).pusher.app_id == "9"
    assert load(env={"PUSHER_URL": URL}, args=flags("--pusher-url", other)).pusher.port == 8301


def test_pusher_url_wins_over_the_separate_credentials() -> None:
    p = load(env={**CREDS, "PUSHER_URL": "http://k:s@h.example/apps/5"}).pusher
    assert (p.app_id, p.key, p.secret, p.host) == ("5", "k", "s", "h.example")


# -- PUSHER_URL parsing ------------------------------------------------------------------------


def test_pusher_url_with_explicit_port() -> None:
    p = parse_pusher_url("http://k:s@127.0.0.1:8301/apps/1", 3.0)
    assert (p.app_id, p.key, p.secret) == ("1", "k", "s")
    assert (p.host, p.port, p.ssl, p.timeout) == ("127.0.0.1", 8301, False, 3.0)
    assert p.base_url == "http://127.0.0.1:8301"


def test_pusher_url_default_ports() -> None:
    https = parse_pusher_url("https://k:s@api-eu.pusher.com/apps/123", 5)
    assert (https.host, https.port, https.ssl) == ("api-eu.pusher.com", 443, True)
    assert https.base_url == "https://api-eu.pusher.com:443"
    plain = parse_pusher_url("http://k:s@soketi.local/apps/123/", 5)
    assert (plain.port, plain.ssl, plain.app_id) == (80, False, "123")


@pytest.mark.parametrize("path,says", [
    ("/apps/abc", "has app id 'abc' after /apps/, but Pusher app ids are numeric"),
    ("/apps/abc/", "has app id 'abc' after /apps/, but Pusher app ids are numeric"),
    ("/1", "must end with /apps/APP_ID, the numeric app id (its path is '/1')"),
    ("", "must end with /apps/APP_ID, the numeric app id (its path is '')"),
    ("/apps/1/extra", "must end with /apps/APP_ID"),
    ("/apps/1//", "must end with /apps/APP_ID"),
])
def test_pusher_url_path_problems_say_what_is_wrong(path: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_pusher_url(f"https://k:{SECRET}@h.example{path}", 5)
    assert says in str(caught.value)
    assert_no_secret(str(caught.value))


def test_pusher_url_one_trailing_slash_is_accepted_on_purpose() -> None:
    assert parse_pusher_url("https://k:s@h.example/apps/7/", 5).app_id == "7"


def test_pusher_url_percent_encoded_key_and_secret() -> None:
    p = parse_pusher_url("https://my%20key:s%2Fe%40c%3Ar%25et@h.example:8443/apps/77", 5)
    assert p.key == "my key"
    assert p.secret == "s/e@c:r%et"
    assert (p.host, p.port) == ("h.example", 8443)


def test_separate_settings_with_host_port_ssl() -> None:
    env = {**CREDS, "PUSHER_HOST": "127.0.0.1", "PUSHER_PORT": "6001", "PUSHER_SSL": "false",
           "PUSHER_CLUSTER": "eu"}
    p = load(env=env).pusher
    assert (p.host, p.port, p.ssl) == ("127.0.0.1", 6001, False)


# -- errors: each names its setting, none holds the secret --------------------------------------

BAD: list[tuple[dict[str, str], str]] = [
    ({**CREDS, "RELAY_POOL_SIZE": "0"}, "RELAY_POOL_SIZE"),
    ({**CREDS, "RELAY_POOL_SIZE": "-3"}, "RELAY_POOL_SIZE"),
    ({**CREDS, "RELAY_POOL_SIZE": "many"}, "RELAY_POOL_SIZE"),
    ({**CREDS, "RELAY_ORDER": "random"}, "RELAY_ORDER"),
    ({**CREDS, "PUSHER_SSL": "maybe"}, "PUSHER_SSL"),
    ({**CREDS, "PUSHER_PORT": "0"}, "PUSHER_PORT"),
    ({**CREDS, "PUSHER_PORT": "70000"}, "PUSHER_PORT"),
    ({**CREDS, "PUSHER_TIMEOUT": "0"}, "PUSHER_TIMEOUT"),
    ({**CREDS, "PUSHER_TIMEOUT": "nan"}, "PUSHER_TIMEOUT"),
    ({**CREDS, "PUSHER_APP_ID": "abc"}, "PUSHER_APP_ID"),
    ({**CREDS, "RELAY_METRICS_ADDR": "9300"}, "RELAY_METRICS_ADDR"),
    ({**CREDS, "RELAY_METRICS_ADDR": ":9300"}, "RELAY_METRICS_ADDR"),
    ({**CREDS, "RELAY_METRICS_ADDR": "localhost:http"}, "RELAY_METRICS_ADDR"),
    ({**CREDS, "RELAY_METRICS_ADDR": "localhost:70000"}, "RELAY_METRICS_ADDR"),
    ({**CREDS, "RELAY_LOG_LEVEL": "verbose"}, "RELAY_LOG_LEVEL"),
    ({**CREDS, "RELAY_LOG_FORMAT": "xml"}, "RELAY_LOG_FORMAT"),
    ({**CREDS, "RELAY_MAX_ATTEMPTS": "0"}, "RELAY_MAX_ATTEMPTS"),
    ({**CREDS, "RELAY_RETRY_FOR": "-1"}, "RELAY_RETRY_FOR"),
    ({**CREDS, "RELAY_RATE_LIMIT": "-1"}, "RELAY_RATE_LIMIT"),
    ({**CREDS, "RELAY_RATE_BURST": "1.5"}, "RELAY_RATE_BURST"),
    ({**CREDS, "RELAY_MAX_BACKLOG": "-1"}, "RELAY_MAX_BACKLOG"),
    ({**CREDS, "RELAY_MAX_AGE": "soon"}, "RELAY_MAX_AGE"),
    ({**CREDS, "RELAY_HEARTBEAT_TTL": "0"}, "RELAY_HEARTBEAT_TTL"),
    ({**CREDS, "RELAY_LINGER": "-1"}, "RELAY_LINGER"),
    ({**CREDS, "RELAY_PREFETCH": "0"}, "RELAY_PREFETCH"),
    ({**CREDS, "RELAY_DASHBOARD_ADDR": "9400"}, "RELAY_DASHBOARD_ADDR"),
    ({**CREDS, "RELAY_DASHBOARD_AUTH": "nocolon"}, "RELAY_DASHBOARD_AUTH"),
    ({**CREDS, "RELAY_DASHBOARD_AUTH": ":pw"}, "RELAY_DASHBOARD_AUTH"),
    ({**CREDS, "RELAY_QUEUE": "two words"}, "RELAY_QUEUE"),
    ({**CREDS, "RELAY_MAX_DATA_BYTES": "0"}, "RELAY_MAX_DATA_BYTES"),
    ({**CREDS, "RELAY_MAX_DATA_BYTES": "1048577"}, "RELAY_MAX_DATA_BYTES"),
    ({**CREDS, "RELAY_MAX_DATA_BYTES": "big"}, "RELAY_MAX_DATA_BYTES"),
    ({**CREDS, "PUSHER_ENCRYPTION_MASTER_KEY_BASE64": SECRET},
     "PUSHER_ENCRYPTION_MASTER_KEY_BASE64"),
    ({**CREDS, "PUSHER_ENCRYPTION_MASTER_KEY_BASE64": base64.b64encode(b"short").decode()},
     "PUSHER_ENCRYPTION_MASTER_KEY_BASE64"),
    ({**CREDS, "PUSHER_ENCRYPTION_MASTER_KEY_BASE64": ""}, "PUSHER_ENCRYPTION_MASTER_KEY_BASE64"),
    ({**CREDS, "REDIS_URL": "localhost:6379"}, "REDIS_URL"),
    ({**CREDS, "REDIS_URL": f"http://u:{SECRET}@h/0"}, "REDIS_URL"),
    ({**CREDS, "REDIS_URL": f"redis://:{SECRET}@h:notaport/0"}, "REDIS_URL"),
    ({**CREDS, "REDIS_URL": f"redis://:{SECRET}@h:99999/0"}, "REDIS_URL"),
    ({**CREDS, "REDIS_URL": f"redis://:{SECRET}@h/0?db=x"}, "REDIS_URL"),
    ({**CREDS, "REDIS_URL": ""}, "REDIS_URL"),
    ({}, "PUSHER_APP_ID"),
    ({"PUSHER_APP_ID": "1", "PUSHER_KEY": "k"}, "PUSHER_SECRET"),
    ({"PUSHER_APP_ID": "1", "PUSHER_SECRET": SECRET}, "PUSHER_KEY"),
    ({**CREDS, "PUSHER_SECRET": ""}, "PUSHER_SECRET"),
    ({"PUSHER_URL": f"ftp://k:{SECRET}@h.example/apps/1"}, "PUSHER_URL"),
    ({"PUSHER_URL": f"https://{SECRET}@h.example/apps/1"}, "PUSHER_URL"),
    ({"PUSHER_URL": f"https://:{SECRET}@h.example/apps/1"}, "PUSHER_URL"),
    ({"PUSHER_URL": "https://k@h.example/apps/1"}, "PUSHER_URL"),
    ({"PUSHER_URL": f"https://k:{SECRET}@h.example/apps/abc"}, "PUSHER_URL"),
    ({"PUSHER_URL": f"https://k:{SECRET}@h.example/1"}, "PUSHER_URL"),
    ({"PUSHER_URL": f"https://k:{SECRET}@/apps/1"}, "PUSHER_URL"),
    ({"PUSHER_URL": f"https://k:{SECRET}@h.example:port/apps/1"}, "PUSHER_URL"),
    ({"PUSHER_URL": f"https://k:{SECRET}@h.example:99999/apps/1"}, "PUSHER_URL"),
    ({"PUSHER_URL": f"https://k:{SECRET}@[::1/apps/1"}, "PUSHER_URL"),
    ({"PUSHER_URL": SECRET}, "PUSHER_URL"),
]


@pytest.mark.parametrize("env,setting", BAD, ids=[f"{s}-{i}" for i, (_, s) in enumerate(BAD)])
def test_bad_value_raises_config_error_naming_the_setting(env: dict[str, str],
                                                          setting: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(env=env)
    assert caught.value.setting == setting
    assert str(caught.value).startswith(f"{setting}: ")
    assert_no_secret(str(caught.value), repr(caught.value))


def test_bad_flag_value_names_the_env_var() -> None:
    with pytest.raises(ConfigError, match=r"^RELAY_POOL_SIZE: must be 1 or more") as caught:
        load(env=dict(CREDS), args=flags("--pool-size", "0"))
    assert caught.value.setting == "RELAY_POOL_SIZE"


def test_secret_absent_from_repr_and_describe() -> None:
    redis_pw = "R3d1sPassw0rd-xyz"
    for env in ({"PUSHER_URL": URL}, dict(CREDS)):
        cfg = load(env={**env, "REDIS_URL": f"redis://user:{redis_pw}@cache.example:6380/3"})
        assert cfg.pusher.secret == SECRET
        texts = (repr(cfg), str(cfg), repr(cfg.pusher), cfg.describe())
        assert_no_secret(*texts)
        for text in texts:
            assert redis_pw not in text
        described = cfg.describe()
        assert "redis=redis://***@cache.example:6380/3" in described
        assert "secret=***" in described
        assert "key=the-key" in described
        assert "pool_size=50" in described


def test_describe_masks_a_lone_redis_token() -> None:
    cfg = load(env={**CREDS, "REDIS_URL": "rediss://tok3n-only-xyz@cache.example/0"})
    assert "tok3n-only-xyz" not in cfg.describe()
    assert "redis=rediss://***@cache.example/0" in cfg.describe()


def test_describe_keeps_a_password_free_redis_url() -> None:
    cfg = load(env={**CREDS, "REDIS_URL": "redis://cache.example:6379/2"})
    assert "redis=redis://cache.example:6379/2" in cfg.describe()


# -- python worker.py, for real ----------------------------------------------------------------


def run_worker(redis_server: RedisServer, *args: str, **env: str
               ) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("RELAY_", "PUSHER_",
                                                                      "REDIS_"))}
    full.update(REDIS_URL=redis_server.url, RELAY_METRICS_ADDR="off", **env)
    return subprocess.run([sys.executable, "worker.py", *args], cwd=ROOT, env=full,
                          capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)


def test_worker_without_credentials_exits_2_with_one_line(redis_server: RedisServer) -> None:
    done = run_worker(redis_server)
    assert done.returncode == 2, done
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert "PUSHER_APP_ID" in lines[0]
    assert done.stdout == ""


def test_worker_with_malformed_url_never_prints_the_secret(redis_server: RedisServer) -> None:
    done = run_worker(redis_server, PUSHER_URL=f"https://k:{SECRET}@h.example/nope/1")
    assert done.returncode == 2, done
    assert "PUSHER_URL" in done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert_no_secret(done.stdout, done.stderr)


def test_worker_with_pool_size_0_exits_2(redis_server: RedisServer) -> None:
    done = run_worker(redis_server, RELAY_POOL_SIZE="0", **CREDS)
    assert done.returncode == 2, done
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert "RELAY_POOL_SIZE" in done.stderr
    assert_no_secret(done.stdout, done.stderr)


def test_worker_with_a_wrong_master_key_exits_2_without_printing_it(
        redis_server: RedisServer) -> None:
    wrong = base64.b64encode(b"31 bytes of key material, wrong").decode()
    done = run_worker(redis_server, PUSHER_ENCRYPTION_MASTER_KEY_BASE64=wrong, **CREDS)
    assert done.returncode == 2, done
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert "PUSHER_ENCRYPTION_MASTER_KEY_BASE64" in done.stderr
    assert wrong not in done.stderr + done.stdout
    assert_no_secret(done.stdout, done.stderr)


def test_defaults_of_the_new_limits() -> None:
    cfg = load(env=dict(CREDS))
    assert (cfg.max_data_bytes, cfg.limits.encryption) == (10240, False)
    assert cfg.pusher.encryption_master_key_base64 is None
    with_key = load(env={**CREDS, "PUSHER_ENCRYPTION_MASTER_KEY_BASE64": KEY_A})
    assert KEY_A not in repr(with_key) + with_key.describe()


def test_worker_help_lists_every_contract_variable(redis_server: RedisServer) -> None:
    done = run_worker(redis_server, "--help")
    assert done.returncode == 0, done
    contract = ["REDIS_URL", "RELAY_QUEUE", "PUSHER_URL", "PUSHER_APP_ID", "PUSHER_KEY",
                "PUSHER_SECRET", "PUSHER_CLUSTER", "PUSHER_HOST", "PUSHER_PORT", "PUSHER_SSL",
                "PUSHER_TIMEOUT", "RELAY_EVENT", "RELAY_POOL_SIZE", "RELAY_RATE_LIMIT",
                "RELAY_RATE_BURST", "RELAY_MAX_ATTEMPTS", "RELAY_RETRY_FOR",
                "RELAY_MAX_BACKLOG", "RELAY_MAX_AGE", "RELAY_ORDER", "RELAY_METRICS_ADDR",
                "RELAY_LOG_LEVEL", "RELAY_LOG_FORMAT", "PUSHER_ENCRYPTION_MASTER_KEY_BASE64",
                "RELAY_MAX_DATA_BYTES"]
    missing = [name for name in contract if name not in done.stdout]
    assert not missing, done.stdout
    for s in SETTINGS:
        assert s.flag in done.stdout
