"""relay: move realtime notifications from a Redis list to the Pusher Channels HTTP API."""

__version__ = "1.1.0"
