"""The root of relay's own exceptions.

Written so Python 2.7 can read it and with no imports: relay.rules and relay.producer,
which must stay importable on 2.7, may build on it. Catch RelayError to catch anything
relay raises on purpose; library errors (redis, requests) are never wrapped in it.
"""


class RelayError(Exception):
    """Something relay itself refuses or detects: bad input, bad settings, a reaped worker."""


class SettingError(RelayError, ValueError):
    """A setting read outside the worker (the producer's RELAY_MAX_DATA_BYTES) is malformed;
    the text names it, as the worker's own ConfigError does."""
