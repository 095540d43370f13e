"""relay.apps: the RELAY_APPS file, every way it can be wrong, defaults, reload, secrets.

Every URL in these files carries SECRET and every master key is MASTER: no message, repr or
log line may show either.
"""

from __future__ import annotations

import base64
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from relay import apps as apps_module
from relay.apps import (
    App,
    AppDefaults,
    Apps,
    AppsError,
    UnknownApp,
    from_config,
    load_apps,
    reload,
    single_app,
)
from relay.config import ConfigError, load
from relay.message import InvalidMessage, Limits, parse
from relay.rules import MAX_DATA_BYTES_CEILING

SECRET = "Zq9sEcReT-apps-7731"
MASTER = base64.b64encode(b"m" * 32).decode()
OTHER_MASTER = base64.b64encode(b"o" * 32).decode()
URL_A = f"https://key-a:{SECRET}@api-eu.pusher.com/apps/111"
URL_B = f"http://key-b:{SECRET}@127.0.0.1:6001/apps/222"
CREDS = {"PUSHER_URL": f"https://k:{SECRET}@api.example.com/apps/42"}
DEFAULTS = AppDefaults(rate_limit=50, rate_burst=60, max_data_bytes=20_000, timeout=3,
                       encryption_master_key_base64=MASTER)


def write(tmp_path: Path, text: str, mode: int = 0o600, name: str = "apps.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(mode)
    return str(path)


def no_secret(*texts: str) -> None:
    for text in texts:
        assert SECRET not in text and MASTER not in text and OTHER_MASTER not in text, text


TWO_APPS = f"""
# the default app, and a tenant with its own limits
[apps.default]
url = "{URL_A}"

[apps.tenant-b]
url = "{URL_B}"
rate_limit = 2.5
max_data_bytes = 102400
timeout = 1.5
encryption_master_key_base64 = "{OTHER_MASTER}"
"""


# -- a good file -----------------------------------------------------------------------------


def test_two_apps_and_what_each_inherits(tmp_path: Path) -> None:
    apps = load_apps(write(tmp_path, TWO_APPS), DEFAULTS)
    assert apps.names == ("default", "tenant-b") and len(apps) == 2 and "tenant-b" in apps
    default, tenant = apps.find(None), apps.find("tenant-b")
    assert default is apps.default is apps.get("default") is apps.find("default")
    target = default.pusher
    assert (target.app_id, target.key, target.secret) == ("111", "key-a", SECRET)
    assert (target.host, target.port, target.ssl) == ("api-eu.pusher.com", 443, True)
    # what the table leaves out comes from the global settings
    assert (default.rate_limit, default.rate_burst, default.max_data_bytes) == (50, 60, 20_000)
    assert (default.timeout, default.encryption_master_key_base64) == (3, MASTER)
    assert default.limits == Limits(20_000, encryption=True)
    # what it gives is its own; a rate_limit without rate_burst: a second's worth, rounded up
    assert (tenant.pusher.host, tenant.pusher.port, tenant.pusher.ssl) == ("127.0.0.1", 6001,
                                                                           False)
    assert (tenant.rate_limit, tenant.rate_burst, tenant.max_data_bytes) == (2.5, 3, 102_400)
    assert (tenant.timeout, tenant.encryption_master_key_base64) == (1.5, OTHER_MASTER)
    assert [a.name for a in apps] == ["default", "tenant-b"]
    assert (apps.path, apps.defaults) == (str(tmp_path / "apps.toml"), DEFAULTS)


def test_burst_and_encryption_overrides(tmp_path: Path) -> None:
    text = f"""
[apps.only-burst]
url = "{URL_A}"
rate_burst = 7
[apps.both]
url = "{URL_A}"
rate_limit = 10
rate_burst = 0
[apps.plain]
url = "{URL_B}"
encryption_master_key_base64 = ""
"""
    apps = load_apps(write(tmp_path, text), DEFAULTS)
    assert (apps.find("only-burst").rate_limit, apps.find("only-burst").rate_burst) == (50, 7)
    assert (apps.find("both").rate_limit, apps.find("both").rate_burst) == (10, 0)
    plain = apps.find("plain")
    assert plain.encryption_master_key_base64 is None  # "" turns the global key off
    assert plain.limits.encryption is False


def test_limits_for_routes_parsing_and_dead_letters_unknown_apps(tmp_path: Path) -> None:
    apps = load_apps(write(tmp_path, TWO_APPS), DEFAULTS)
    big = '{"relay":2,"app":"tenant-b","channels":["c"],"event":"e","data":"' + "x" * 50_000
    assert parse((big + '"}').encode(), "hit", apps.limits_for).app == "tenant-b"
    with pytest.raises(InvalidMessage, match="over the limit of 20000"):
        parse(b'{"channel":"c","d":"' + b"x" * 30_000 + b'"}', "hit", apps.limits_for)
    with pytest.raises(UnknownApp) as caught:
        parse(b'{"relay":2,"app":"gone","channels":["c"],"event":"e","data":1}', "hit",
              apps.limits_for)
    assert str(caught.value) == "unknown app 'gone' (known apps: default, tenant-b)"
    assert isinstance(caught.value, InvalidMessage) and caught.value.app == "gone"
    assert apps.get("gone") is None


def test_unknown_app_messages(tmp_path: Path) -> None:
    without_default = Apps({"a": App("a", single_app(load(env=CREDS)).find(None).pusher)})
    with pytest.raises(UnknownApp, match=r"no app named 'default' .*\(known apps: a\)"):
        without_default.find(None)
    many = Apps({f"t{i:02}": without_default.find("a") for i in range(25)})
    with pytest.raises(UnknownApp, match=r"known apps: t00, .*, t19 and 5 more\)$"):
        many.find("x")


def test_without_a_file_pusher_url_is_default_exactly_as_before() -> None:
    cfg = load(env={**CREDS, "RELAY_RATE_LIMIT": "4", "RELAY_MAX_DATA_BYTES": "5000",
                    "PUSHER_ENCRYPTION_MASTER_KEY_BASE64": MASTER})
    apps = from_config(cfg)
    assert apps.names == ("default",) and apps.path is None
    default = apps.find(None)
    assert default.pusher == cfg.pusher
    assert (default.rate_limit, default.rate_burst, default.max_data_bytes) == (4, 4, 5000)
    assert default.limits == cfg.limits
    with pytest.raises(UnknownApp, match=r"unknown app 'tenant-b' \(known apps: default\)"):
        apps.find("tenant-b")


def test_with_a_file_the_global_settings_are_the_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, f'[apps.default]\nurl = "{URL_A}"\n')
    cfg = load(env={**CREDS, "RELAY_APPS": path, "RELAY_RATE_LIMIT": "8", "PUSHER_TIMEOUT": "2",
                    "RELAY_MAX_DATA_BYTES": "4096",
                    "PUSHER_ENCRYPTION_MASTER_KEY_BASE64": MASTER})
    apps = from_config(cfg)
    assert apps.path == path
    default = apps.find(None)
    assert default.pusher.app_id == "111"  # the file's, not PUSHER_URL's
    assert (default.rate_limit, default.rate_burst, default.max_data_bytes) == (8, 8, 4096)
    assert (default.timeout, default.encryption_master_key_base64) == (2, MASTER)


def test_single_app_needs_pusher_credentials() -> None:
    cfg = load(env=CREDS, need_pusher=False)
    with pytest.raises(ConfigError, match="PUSHER_URL"):
        single_app(cfg)


# -- every error: one line naming the file, the app and the key; never a secret ---------------

OK = f'url = "{URL_A}"'
ERRORS: list[tuple[str, str, str]] = [  # (file text, "[apps.X] key" or "", what it says)
    ("[apps.a]\nrate_limit = 1\n", "[apps.a] url", "missing: every app needs url = "),
    (f"[apps.a]\n{OK}\nurll = 1\n", "[apps.a] 'urll'", "unknown key; an app takes url, "),
    (f"[apps.a]\n{OK}\nsecret = '{SECRET}'\n", "[apps.a] 'secret'", "unknown key"),
    (f"[apps.a]\n{OK}\n[apps.b]\n{OK}\n[apps.a]\n{OK}\n", "[apps.a]",
     "the app is declared twice (lines 1 and 5); app names must be unique"),
    (f"[apps]\na = {{ {OK} }}\n[apps.a]\n{OK}\n", "[apps.a]", "declared twice (line 3"),
    (f"[apps.a]\n{OK}\n{OK}\n", "[apps.a]", "not valid TOML: Cannot overwrite a value (line 3"),
    (f"[apps.a]\nurl = https://k:{SECRET}@h/apps/1\n", "[apps.a]",
     "not valid TOML: Invalid value (line 2, column 7)"),
    (f'[apps.a]\nurl = "https://k:{SECRET}\n', "[apps.a]", "not valid TOML: Illegal character"),
    (f'[apps.a]\nurl = "https://k:{SECRET}@h/apps/1" {SECRET}\n', "[apps.a]",
     "not valid TOML: Expected newline"),
    (f"[apps.a]\n{OK}\nrate_limit = [1,\n", "[apps.a]", "(at the end of the file)"),
    (f'[apps.a]\n{OK}\nx = {{ "{URL_A}" = 1, "{URL_A}" = 2 }}\n', "[apps.a]",
     "not valid TOML: Duplicate inline table key (line 3"),  # TOML would quote the key
    ("", "", "has no app: add an [apps.NAME] table with url = "),
    ("[apps]\n", "", "has no app"),
    (f"[app.a]\n{OK}\n", "", "'app' is not allowed at the top level"),
    (f"[apps]\na = '{URL_A}'\n", "[apps.a]", "must be a table"),
    (f'[apps."a b"]\n{OK}\n', '[apps."a b"]', "an app name is 1 to 64 letters, digits,"),
    (f'[apps."a.b"]\n{OK}\n', '[apps."a.b"]', "an app name is 1 to 64"),
    (f'[apps.""]\n{OK}\n', '[apps.""]', "an app name is 1 to 64"),
    (f"[apps.{'x' * 65}]\n{OK}\n", f'[apps."{"x" * 64}"]', "an app name is 1 to 64"),
    (f"[apps.a.b]\n{OK}\n", "[apps.a] 'b'", "unknown key (a table: an app name cannot hold a dot)"),
    ("[apps.a]\nurl = 5\n", "[apps.a] url", "must be a string"),
    (f'[apps.a]\nurl = "ftp://k:{SECRET}@h/apps/1"\n', "[apps.a] url",
     "must start with https:// or http://"),
    ('[apps.a]\nurl = "https://h/apps/1"\n', "[apps.a] url", "must carry KEY:SECRET@"),
    (f'[apps.a]\nurl = "https://k{SECRET}@h/apps/1"\n', "[apps.a] url", "must carry KEY:SECRET@"),
    (f'[apps.a]\nurl = "https://k:{SECRET}/apps/1"\n', "[apps.a] url", "is not a valid URL"),
    (f'[apps.a]\nurl = "https://k:{SECRET}@h/apps/abc"\n', "[apps.a] url",
     "has app id 'abc' after /apps/"),
    (f'[apps.a]\nurl = "https://k:{SECRET}@h/"\n', "[apps.a] url", "must end with /apps/APP_ID"),
    (f"[apps.a]\n{OK}\nrate_limit = -1\n", "[apps.a] rate_limit", "must be 0 or more (got '-1')"),
    (f"[apps.a]\n{OK}\nrate_limit = '10'\n", "[apps.a] rate_limit",
     "must be a number, not a string"),
    (f"[apps.a]\n{OK}\nrate_limit = true\n", "[apps.a] rate_limit", "not a boolean"),
    (f"[apps.a]\n{OK}\nrate_limit = inf\n", "[apps.a] rate_limit", "must be a finite number"),
    (f"[apps.a]\n{OK}\nrate_limit = nan\n", "[apps.a] rate_limit", "must be a finite number"),
    (f"[apps.a]\n{OK}\nrate_burst = -2\n", "[apps.a] rate_burst", "must be 0 or more"),
    (f"[apps.a]\n{OK}\nrate_burst = 1.5\n", "[apps.a] rate_burst",
     "must be a whole number (got 1.5)"),
    (f"[apps.a]\n{OK}\nmax_data_bytes = 0\n", "[apps.a] max_data_bytes", "must be 1 to"),
    (f"[apps.a]\n{OK}\nmax_data_bytes = {MAX_DATA_BYTES_CEILING + 1}\n",
     "[apps.a] max_data_bytes", f"must be 1 to {MAX_DATA_BYTES_CEILING} bytes"),
    (f"[apps.a]\n{OK}\nmax_data_bytes = 1979-05-27\n", "[apps.a] max_data_bytes",
     "not a date or time"),
    (f"[apps.a]\n{OK}\ntimeout = 0\n", "[apps.a] timeout", "must be more than 0"),
    (f"[apps.a]\n{OK}\ntimeout = {{}}\n", "[apps.a] timeout", "not a table"),
    (f"[apps.a]\n{OK}\nencryption_master_key_base64 = '{SECRET}'\n",
     "[apps.a] encryption_master_key_base64", "must be base64 (got ***)"),
    (f"[apps.a]\n{OK}\nencryption_master_key_base64 = '{MASTER[:-8]}'\n",
     "[apps.a] encryption_master_key_base64", "must be base64 of 32 bytes"),
    (f"[apps.a]\n{OK}\nencryption_master_key_base64 = 32\n",
     "[apps.a] encryption_master_key_base64", "must be a string (base64 of 32 bytes)"),
]


@pytest.mark.parametrize("text,where,problem", ERRORS, ids=[e[2][:40] for e in ERRORS])
def test_each_error_names_file_app_and_key_and_no_secret(tmp_path: Path, text: str, where: str,
                                                         problem: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(AppsError) as caught:
        load_apps(path, DEFAULTS)
    message = str(caught.value)
    prefix = f"RELAY_APPS: {path}: " + (f"{where}: " if where else "")
    assert message.startswith(prefix), message
    assert problem in message[len(prefix):], message
    assert "\n" not in message
    assert isinstance(caught.value, ConfigError) and caught.value.setting == "RELAY_APPS"
    no_secret(message)


@pytest.mark.parametrize("make,problem", [
    (lambda p: p / "absent.toml", "cannot be read: No such file or directory"),
    (lambda p: p, "cannot be read: Is a directory"),
    (lambda p: Path(os.devnull), "is not a regular file"),
    (lambda p: Path(write(p, "[apps.a]\nurl = 'caf\xe9'\n")).write_bytes(
        b"[apps.a]\nurl = 'caf\xe9'\n") and p / "apps.toml", "is not UTF-8 text"),
])
def test_unreadable_files(tmp_path: Path, make: Any, problem: str) -> None:
    path = str(make(tmp_path))
    with pytest.raises(AppsError, match=f"^RELAY_APPS: {path}: {problem}"):
        load_apps(path)


def test_no_secret_in_repr_describe_or_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                            ) -> None:
    caplog.set_level(logging.DEBUG, logger="relay.apps")
    path = write(tmp_path, TWO_APPS, mode=0o644)
    apps = load_apps(path, DEFAULTS)
    changed = write(tmp_path, TWO_APPS.replace("tenant-b", "tenant-c"), mode=0o644)
    reload(changed, apps)
    reload(write(tmp_path, f"[apps.a]\nurl = 'https://k:{SECRET}'\n", name="bad.toml"), apps)
    texts = [repr(apps), apps.describe(), repr(list(apps)), repr(DEFAULTS), caplog.text]
    no_secret(*texts)
    assert "key-a" in apps.describe() and "secret=" not in apps.describe()
    assert "tenant-b=http://127.0.0.1:6001/apps/222" in apps.describe()


# -- the permission warning ------------------------------------------------------------------


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "relay.apps" and r.levelno == logging.WARNING and "mode" in r.getMessage()]


@pytest.mark.parametrize("mode,warned", [(0o600, False), (0o400, False), (0o640, True),
                                         (0o604, True), (0o644, True), (0o660, True)])
def test_a_file_others_can_read_is_warned_about_with_its_mode(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: int, warned: bool) -> None:
    path = write(tmp_path, TWO_APPS, mode=mode)
    load_apps(path, DEFAULTS)
    expected = ([f"RELAY_APPS file {path} has mode {mode:04o}: group or others can read the "
                 "Pusher secrets in it (chmod 600 it)"] if warned else [])
    assert warnings_of(caplog) == expected


def test_the_mode_warning_is_logged_once_across_reloads(tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path, TWO_APPS, mode=0o644)
    apps = load_apps(path, DEFAULTS)
    apps = reload(path, apps)
    assert isinstance(apps, Apps) and apps.file_mode == 0o644
    assert len(warnings_of(caplog)) == 1
    os.chmod(path, 0o640)
    reload(path, apps)
    assert [w.split(": ")[0][-9:] for w in warnings_of(caplog)] == ["mode 0644", "mode 0640"]


def test_no_default_app_is_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                        ) -> None:
    apps = load_apps(write(tmp_path, f"[apps.a]\n{OK}\n"))
    assert apps.default is None
    assert "has no [apps.default]: notifications naming no app" in caplog.text


# -- reload (SIGHUP) -------------------------------------------------------------------------


def test_reload_adds_changes_and_removes(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                         ) -> None:
    caplog.set_level(logging.INFO, logger="relay.apps")
    path = write(tmp_path, TWO_APPS)
    before = load_apps(path, DEFAULTS)
    write(tmp_path, TWO_APPS.replace("tenant-b", "tenant-c").replace(
        f'url = "{URL_A}"', f'url = "{URL_A.replace(SECRET, "rotated")}"'))
    after = reload(path, before)
    assert isinstance(after, Apps)
    assert after.names == ("default", "tenant-c") and after.defaults == DEFAULTS
    assert after.find(None).pusher.secret == "rotated"
    changes = before.changes(after)
    assert (changes.added, changes.removed, changes.changed) == (("tenant-c",), ("tenant-b",),
                                                                 ("default",))
    assert str(changes) == "added tenant-c; removed tenant-b; changed default"
    assert f"RELAY_APPS reloaded from {path}: 2 app(s) (added tenant-c; removed tenant-b; " \
           "changed default)" in caplog.text
    assert not after.changes(reload(path, after))  # the same file: no change
    assert str(after.changes(after)) == "no change"


def test_a_bad_file_keeps_the_old_apps_and_logs_one_line(tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path, TWO_APPS)
    before = load_apps(path, DEFAULTS)
    write(tmp_path, "[apps.default]\nrate_limit = 1\n")
    result = reload(path, before)
    assert isinstance(result, AppsError) and "[apps.default] url: missing" in str(result)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [f"RELAY_APPS not reloaded, keeping the 2 app(s) loaded before: {result}"]
    assert before.names == ("default", "tenant-b")  # untouched: the caller keeps using it


def test_reload_without_a_file_keeps_the_single_app() -> None:
    apps = single_app(load(env=CREDS))
    assert reload(None, apps) is apps


def test_apps_are_read_only(tmp_path: Path) -> None:
    apps = load_apps(write(tmp_path, TWO_APPS), DEFAULTS)
    with pytest.raises(TypeError):
        apps.by_name["x"] = apps.find(None)  # type: ignore[index]
    assert apps_module.KEYS == ("url", "rate_limit", "rate_burst", "max_data_bytes", "timeout",
                                "encryption_master_key_base64")
