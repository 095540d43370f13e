"""Pusher's limits and name rules: the one source for the worker's parser, the producer
helper and the local Pusher-compatible server.

Written in syntax that Python 2.7 and 3.6 still read (no annotations, no f-strings): the
producer helper imports this module inside legacy apps. Each check returns the reason a
notification would be refused, or None, so each caller raises its own error type.
"""

# ruff: noqa: UP030, UP031, UP032  (f-strings and "{}" are not Python 2.7 syntax)

import re

MAX_BATCH_EVENTS = 10  # events in one batch_events call
MAX_CHANNELS = 100  # channels in one trigger call
MAX_CHANNEL_NAME = 164  # characters in a channel name
MAX_USER_ID = 200  # characters of the user id after "#server-to-user-" (pusher library)
MAX_EVENT_NAME = 200  # characters in an event name
MAX_DATA_BYTES = 10240  # UTF-8 bytes of an event's data (Pusher's; RELAY_MAX_DATA_BYTES)
MAX_DATA_BYTES_CEILING = 1024 * 1024  # the most RELAY_MAX_DATA_BYTES may say (no server takes more)

MAX_APP_NAME = 64  # characters in an app name (RELAY_APPS, the envelope's `app`)

SERVER_TO_USER_PREFIX = "#server-to-user-"
ENCRYPTED_PREFIX = "private-encrypted-"
DEFAULT_APP = "default"  # the app that gets notifications naming none

_NAME = re.compile(r"\A[-a-zA-Z0-9_=@,.;]+\Z")
_SOCKET_ID = re.compile(r"\A\d+\.\d+\Z")
# TOML's bare-key characters, so `[apps.NAME]` never needs quotes (a dot would nest a table).
_APP_NAME = re.compile(r"\A[A-Za-z0-9_-]+\Z")

try:  # Python 2: JSON text arrives as unicode
    TEXT_TYPES = (str, unicode)  # noqa: F821
except NameError:
    TEXT_TYPES = (str,)


def channel_problem(channel):
    """Why Pusher refuses this channel name, or None (a `#server-to-user-` name included)."""
    if not isinstance(channel, TEXT_TYPES) or not channel:
        return "channel must be a non-empty string"
    if channel.startswith(SERVER_TO_USER_PREFIX):
        rest, limit, what = channel[len(SERVER_TO_USER_PREFIX):], MAX_USER_ID, "user id"
    else:
        rest, limit, what = channel, MAX_CHANNEL_NAME, "channel name"
    if len(rest) > limit:
        return "{0} longer than {1} characters".format(what, limit)
    if not _NAME.match(rest):
        return "invalid channel name {0!r}".format(channel[:80])
    return None


def event_problem(event):
    """Why Pusher refuses this event name, or None."""
    if not isinstance(event, TEXT_TYPES) or not event:
        return "event must be a non-empty string"
    if len(event) > MAX_EVENT_NAME:
        return "event name longer than {0} characters".format(MAX_EVENT_NAME)
    return None


def data_size_problem(size, limit=MAX_DATA_BYTES):
    """Why data of `size` UTF-8 bytes is refused, or None."""
    if size > limit:
        return "data is {0} bytes, over the limit of {1}".format(size, limit)
    return None


def data_limit_problem(value):
    """Why `value` cannot be RELAY_MAX_DATA_BYTES, or None: the worker's rule (relay.config)."""
    if isinstance(value, bool) or not isinstance(value, int):
        return "must be a number"
    if not 1 <= value <= MAX_DATA_BYTES_CEILING:
        return "must be 1 to {0} bytes".format(MAX_DATA_BYTES_CEILING)
    return None


def socket_id_problem(socket_id):
    """Why this socket_id (None allowed) is refused, or None."""
    if socket_id is None:
        return None
    if not isinstance(socket_id, TEXT_TYPES) or not _SOCKET_ID.match(socket_id):
        return "socket_id must look like 1234.5678"
    return None


def app_problem(app):
    """Why this app name is refused, or None: 1 to 64 of A-Z a-z 0-9 _ -, TOML's bare-key
    characters, so the same name is a `[apps.NAME]` table and a label without quoting."""
    if not isinstance(app, TEXT_TYPES) or not app:
        return "app must be a non-empty string"
    if len(app) > MAX_APP_NAME or not _APP_NAME.match(app):
        return ("invalid app name {0!r}: 1 to {1} letters, digits, '_' or '-'"
                .format(app[:80], MAX_APP_NAME))
    return None
