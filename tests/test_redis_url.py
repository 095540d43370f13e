"""REDIS_URL parsing for every form: the spec, the errors (never quoting the URL), masking,
and the worker's exit 2 on a malformed URL of any form."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from relay import redis_url
from relay.config import ConfigError, load
from tests.support import ROOT

SECRET = "hunter2-secret"
CREDS = {"PUSHER_URL": "http://key:sec@127.0.0.1:1/apps/1"}


def test_sentinel_form() -> None:
    spec = redis_url.parse(f"redis+sentinel://app:{SECRET}@s1:26380,s2,[::1]:26381/mymaster/3"
                           f"?sentinel_password=sp&ssl_cert_reqs=none")
    assert spec.kind == redis_url.SENTINEL
    assert spec.hosts == [("s1", 26380), ("s2", 26379), ("::1", 26381)]
    assert (spec.service, spec.db, spec.username, spec.password) == ("mymaster", 3, "app",
                                                                     SECRET)
    assert spec.sentinel_password == "sp" and not spec.ssl
    assert spec.connection_kwargs() == {"username": "app", "password": SECRET,
                                        "ssl_cert_reqs": "none", "ssl_check_hostname": False}
    assert spec.sentinel_kwargs()["password"] == "sp"
    assert redis_url.parse("rediss+sentinel://s1/svc").ssl


def test_cluster_form() -> None:
    spec = redis_url.parse(f"rediss+cluster://:{SECRET}@n1:7000,n2:7001?ssl_ca_certs=/ca.pem")
    assert spec.kind == redis_url.CLUSTER and spec.ssl
    assert spec.hosts == [("n1", 7000), ("n2", 7001)]
    assert spec.password == SECRET and spec.username is None
    assert spec.options == {"ssl_ca_certs": "/ca.pem"}
    assert redis_url.parse("redis+cluster://n1/0").hosts == [("n1", 6379)]


@pytest.mark.parametrize("url", [
    "redis://h:6379/0", "rediss://h/0?ssl_ca_certs=/x&ssl_cert_reqs=none", "unix:///tmp/r.sock?db=1",
])
def test_standalone_forms(url: str) -> None:
    assert redis_url.parse(url).kind == redis_url.STANDALONE


@pytest.mark.parametrize("url", [
    f"redis+sentinel://u:{SECRET}@h:26379",  # no service
    f"redis+sentinel://u:{SECRET}@h:port/svc",
    f"redis+sentinel://u:{SECRET}@h:99999/svc",
    f"redis+sentinel://u:{SECRET}@h,,x/svc",
    f"redis+sentinel://u:{SECRET}@h/svc/notadb",
    f"redis+sentinel://u:{SECRET}@h/svc?db_password={SECRET}",  # unknown option
    f"redis+cluster://u:{SECRET}@/",
    f"redis+cluster://u:{SECRET}@h:1/3",  # a cluster has only db 0
    f"redis+cluster://u:{SECRET}@h:1?ssl_cert_reqs=maybe",
    f"redis+cluster://u:{SECRET}@h:1?sentinel_password=x",
    f"redis://:{SECRET}@h:notaport/0", f"http://u:{SECRET}@h/0", f"{SECRET}@h:1", "",
])
def test_malformed_urls_name_redis_url_and_never_the_password(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(env={**CREDS, "REDIS_URL": url})
    assert "REDIS_URL" in str(caught.value) and SECRET not in str(caught.value)


def test_mask_hides_passwords_of_every_form() -> None:
    assert redis_url.mask(f"redis+sentinel://u:{SECRET}@a:1,b:2/svc?sentinel_password={SECRET}"
                          "&ssl_cert_reqs=none") == \
        "redis+sentinel://***@a:1,b:2/svc?sentinel_password=***&ssl_cert_reqs=none"
    assert redis_url.mask(f"rediss+cluster://:{SECRET}@n1:7000,n2") == "rediss+cluster://***@n1:7000,n2"
    assert redis_url.mask("redis://h:1/0") == "redis://h:1/0"
    assert SECRET not in repr(redis_url.parse(f"redis+cluster://:{SECRET}@n1"))


def test_the_worker_exits_2_on_a_malformed_sentinel_url() -> None:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("REDIS", "RELAY"))},
           **CREDS, "REDIS_URL": f"redis+sentinel://u:{SECRET}@h:1/", "RELAY_METRICS_ADDR": "off"}
    done = subprocess.run([sys.executable, str(ROOT / "worker.py")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 1 and "REDIS_URL" in lines[0] and SECRET not in lines[0], lines


def test_the_producer_builds_each_form_without_connecting(monkeypatch) -> None:
    from relay import producer

    monkeypatch.setenv("REDIS_URL", "redis+sentinel://127.0.0.1:1/svc")
    client = producer.client_from_env()  # a Sentinel master client: connects on first use
    assert type(client.connection_pool).__name__ == "SentinelConnectionPool"
    monkeypatch.setenv("REDIS_URL", f"redis+sentinel://u:{SECRET}@h:x/svc")
    with pytest.raises(redis_url.RedisUrlError) as caught:
        producer.client_from_env()
    assert SECRET not in str(caught.value)
