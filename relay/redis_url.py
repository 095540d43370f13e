"""REDIS_URL in every form relay accepts, parsed into one small spec, and plain clients.

1. `parse(url)` -> `RedisSpec`: standalone (`redis://`, `rediss://`, `unix://`, checked by
   redis-py's own parser), Sentinel (`redis+sentinel://`, `rediss+sentinel://`) or Cluster
   (`redis+cluster://`, `rediss+cluster://`). A malformed URL raises `RedisUrlError`, whose
   text never quotes the URL: it may hold a password.
2. `mask(url)`: the URL with its password (and `sentinel_password=`) hidden, for logs.
3. `plain_client(url, ...)`: a redis-py client for that form with redis-py's own pools; the
   producer helper uses it. The worker builds capped clients in `relay.connect`.

The producer imports this module and runs on Python 2.7 to 3.13, so this file uses the
syntax both read (no annotations, no f-strings) and imports only the stdlib and redis.
Sentinel and Cluster clients are built only if the installed redis-py has them.
"""

try:  # Python 3
    from urllib.parse import parse_qsl, unquote, urlsplit
except ImportError:  # Python 2.7
    from urllib import unquote  # noqa: I001
    from urlparse import parse_qsl, urlsplit

import redis

STANDALONE, SENTINEL, CLUSTER = "standalone", "sentinel", "cluster"
SCHEMES = {
    "redis": (STANDALONE, False), "rediss": (STANDALONE, True), "unix": (STANDALONE, False),
    "redis+sentinel": (SENTINEL, False), "rediss+sentinel": (SENTINEL, True),
    "redis+cluster": (CLUSTER, False), "rediss+cluster": (CLUSTER, True),
}
DEFAULT_PORT = {SENTINEL: 26379, CLUSTER: 6379}
# Query options of the multi-host forms: TLS for every connection, and the sentinels' own
# credentials. Anything else is refused rather than silently ignored.
TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs",
               "ssl_check_hostname")
SENTINEL_OPTIONS = ("sentinel_password", "sentinel_username")
CERT_REQS = ("none", "optional", "required")
FORMS = ("redis://[user:password@]host:port/db, rediss://..., unix:///path?db=0, "
         "redis+sentinel://[user:password@]host:port[,host:port...]/SERVICE[/db], "
         "redis+cluster://[user:password@]host:port[,host:port...]")


class RedisUrlError(ValueError):
    """A REDIS_URL that cannot be used; the text names the problem, never the URL."""


class RedisSpec:
    """Where Redis lives: `kind` is standalone, sentinel or cluster.

    standalone keeps the `url` for redis-py's own parser; the multi-host forms carry
    `hosts` [(host, port)], credentials, `ssl` and the TLS `options`; Sentinel also the
    `service` name, the `db` and the sentinels' own credentials.
    """

    def __init__(self, kind, url, hosts=(), service=None, db=0, username=None,
                 password=None, ssl=False, options=None, sentinel_username=None,
                 sentinel_password=None):
        self.kind = kind
        self.url = url
        self.hosts = list(hosts)
        self.service = service
        self.db = db
        self.username = username
        self.password = password
        self.ssl = ssl
        self.options = dict(options or {})
        self.sentinel_username = sentinel_username
        self.sentinel_password = sentinel_password

    def __repr__(self):  # never the password
        return "RedisSpec(" + self.kind + ", " + mask(self.url) + ")"

    def connection_kwargs(self):
        """Credentials and TLS settings for every connection to a Redis node."""
        kwargs = dict(self.options)
        if self.username:
            kwargs["username"] = self.username
        if self.password:
            kwargs["password"] = self.password
        if self.ssl:
            kwargs["ssl"] = True
        return kwargs

    def sentinel_kwargs(self):
        """For the connections to the sentinels themselves: their credentials, same TLS."""
        kwargs = dict(self.options)
        if self.sentinel_username:
            kwargs["username"] = self.sentinel_username
        if self.sentinel_password:
            kwargs["password"] = self.sentinel_password
        if self.ssl:
            kwargs["ssl"] = True
        return kwargs


def parse(url):
    """The spec for url; raises RedisUrlError (without quoting the URL) when malformed."""
    if not url:
        raise RedisUrlError("is empty; expected one of " + FORMS)
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme not in SCHEMES:
        raise RedisUrlError("must start with redis://, rediss://, unix://, redis+sentinel://, "
                            "rediss+sentinel://, redis+cluster:// or rediss+cluster://")
    kind, ssl = SCHEMES[scheme]
    if kind == STANDALONE:
        _check_standalone(url)
        return RedisSpec(STANDALONE, url, ssl=ssl)
    parts = _split(url)
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    username, password = _credentials(userinfo)
    hosts = _hosts(hostlist, DEFAULT_PORT[kind])
    query = _query(parts.query, TLS_OPTIONS + (SENTINEL_OPTIONS if kind == SENTINEL else ()))
    sentinel_username = query.pop("sentinel_username", None)
    sentinel_password = query.pop("sentinel_password", None)
    service, db = _path(parts.path, kind)
    return RedisSpec(kind, url, hosts, service, db, username, password, ssl, query,
                     sentinel_username, sentinel_password)


def _split(url):
    try:
        return urlsplit(url)
    except ValueError:
        pass  # raised below, outside the handler: Python 2 has no `raise ... from None`
    raise RedisUrlError("is not a valid URL")


def _check_standalone(url):
    try:  # the parser the client will use, checked now
        from redis.connection import parse_url
    except ImportError:  # redis-py 3.x (the newest for Python 2.7) parses inside the pool
        from redis import ConnectionPool

        def parse_url(url):
            return ConnectionPool.from_url(url)
    try:
        parse_url(url)
        return
    except (ValueError, TypeError):  # its text may quote parts of the URL: keep it out
        pass
    raise RedisUrlError("is not a valid Redis URL (check the port and the query options)")


def _credentials(userinfo):
    if not userinfo:
        return None, None
    user, colon, password = userinfo.partition(":")
    if not colon:  # a lone token is a password, as redis-py reads redis://token@host
        return None, unquote(user)
    return (unquote(user) or None), (unquote(password) or None)


def _hosts(hostlist, default_port):
    if not hostlist:
        raise RedisUrlError("names no host; give host:port[,host:port...]")
    hosts = []
    for item in hostlist.split(","):
        item = item.strip()
        if item.startswith("["):  # [IPv6]:port
            host, _, rest = item[1:].partition("]")
            port_text = rest[1:] if rest.startswith(":") else ""
        else:
            host, _, port_text = item.partition(":")
        if not host:
            raise RedisUrlError("has an empty host in its host list")
        if port_text and not port_text.isdigit():
            raise RedisUrlError("has a port that is not a number")
        port = int(port_text) if port_text else default_port
        if not 0 < port < 65536:
            raise RedisUrlError("has a port out of range")
        hosts.append((host, port))
    return hosts


def _query(query, allowed):
    options = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name not in allowed:
            raise RedisUrlError("has an unknown option " + repr(str(name))
                                + " (known: " + ", ".join(allowed) + ")")
        if name == "ssl_cert_reqs" and value.lower() not in CERT_REQS:
            raise RedisUrlError("ssl_cert_reqs must be none, optional or required")
        if name == "ssl_check_hostname":
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise RedisUrlError("ssl_check_hostname must be true or false")
            value = value.lower() in ("true", "1", "yes")
        options[name] = value
    if options.get("ssl_cert_reqs", "").lower() == "none":
        options.setdefault("ssl_check_hostname", False)  # nothing is verified, not even that
    return options


def _path(path, kind):
    segments = [unquote(s) for s in path.split("/") if s]
    if kind == CLUSTER:
        if segments and segments != ["0"]:
            raise RedisUrlError("of a cluster takes no path (a cluster has only db 0)")
        return None, 0
    if not segments or len(segments) > 2:
        raise RedisUrlError("of a sentinel needs the service name: .../SERVICE[/db]")
    db = 0
    if len(segments) == 2:
        if not segments[1].isdigit():
            raise RedisUrlError("has a db that is not a number")
        db = int(segments[1])
    return segments[0], db


def mask(url):
    """url with the password and any *password= option hidden; the rest stays readable."""
    try:
        scheme, sep, rest = url.partition("://")
    except (AttributeError, TypeError):
        return "<unparsable url>"
    if not sep:
        return url
    netloc, slash, tail = rest.partition("/")
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    if "password=" in tail:
        path, _, query = tail.partition("?")
        masked = []
        for pair in query.split("&"):
            name = pair.split("=", 1)[0]
            masked.append(name + "=***" if "password" in name.lower() else pair)
        tail = path + "?" + "&".join(masked)
    return scheme + sep + netloc + slash + tail


def plain_client(url, **kwargs):
    """A client for any form with redis-py's default pools (the producer helper's).

    kwargs (socket_timeout, socket_connect_timeout, ...) go to every connection.
    """
    spec = parse(url)
    if spec.kind == STANDALONE:
        return redis.Redis.from_url(url, **kwargs)
    if spec.kind == SENTINEL:
        return sentinel_for(spec, kwargs).master_for(spec.service, db=spec.db,
                                                     **_merge(spec.connection_kwargs(), kwargs))
    cluster = _cluster_module()
    nodes = [cluster.ClusterNode(host, port) for host, port in spec.hosts]
    return cluster.RedisCluster(startup_nodes=nodes,
                                **_merge(spec.connection_kwargs(), kwargs))


def sentinel_for(spec, kwargs):
    """The Sentinel manager for spec; its own connections get the socket timeouts too, and
    a `retry` when given (redis-py's default retries a refused sentinel 3 times with
    backoff, seconds per sentinel before the next one is asked)."""
    try:
        from redis.sentinel import Sentinel
    except ImportError:
        Sentinel = None
    if Sentinel is None:
        raise RedisUrlError("needs redis-py with Sentinel support (pip install -U redis)")
    timeouts = dict((k, v) for k, v in kwargs.items()
                    if k.startswith("socket_") or k == "retry")
    return Sentinel(spec.hosts, sentinel_kwargs=_merge(spec.sentinel_kwargs(), timeouts))


def _cluster_module():
    try:
        from redis import cluster
        return cluster
    except ImportError:
        pass
    raise RedisUrlError("needs redis-py 4.1 or newer for Redis Cluster (installed: "
                        + str(getattr(redis, "__version__", "?")) + "; pip install -U redis)")


def _merge(first, second):
    merged = dict(first)
    merged.update(second)
    return merged
