"""Pusher's request rules, applied to a decoded body: pure functions, no I/O.

1. ``parse_trigger`` (POST /events) and ``parse_batch`` (POST /batch_events) return one
   record per channel and the reply body, or raise ``ApiError`` with Pusher's status:
   400 for names, counts and socket ids, 413 for data over the limit.
2. The limits and name rules come from ``relay.rules``, the same source as relay's parser
   and producer, so the two sides can never disagree.
"""

import json
from typing import Any

from relay import rules
from relay.pusher_server.protocol import ApiError

INFO_ATTRIBUTES = ("subscription_count", "user_count")


def _check_channel(channel: Any) -> str:
    problem = rules.channel_problem(channel)
    if problem is not None:
        raise ApiError(400, f"Invalid channel: {problem}")
    return channel


def _check_event(item: dict[str, Any], max_data_bytes: int) -> dict[str, Any]:
    """Validate the fields shared by single and batch events; return a partial record."""
    name, data, socket_id = item.get("name"), item.get("data"), item.get("socket_id")
    problem = rules.event_problem(name)
    if problem is not None:
        raise ApiError(400, f"Invalid event name: {problem}")
    if not isinstance(data, str):
        raise ApiError(400, "Event data must be a string")
    problem = rules.socket_id_problem(socket_id)
    if problem is not None:
        raise ApiError(400, f"Invalid socket_id: {problem}")
    problem = rules.data_size_problem(len(data.encode("utf-8")), max_data_bytes)
    if problem is not None:
        raise ApiError(413, f"Event data too large: {problem}")
    return {"name": name, "data": data, "socket_id": socket_id}


def _channels_of(body: dict[str, Any]) -> list[str]:
    if "channels" in body:
        channels = body["channels"]
        if not isinstance(channels, list) or not channels:
            raise ApiError(400, "channels must be a non-empty list")
    elif "channel" in body:
        channels = [body["channel"]]
    else:
        raise ApiError(400, "Missing channels or channel")
    if len(channels) > rules.MAX_CHANNELS:
        raise ApiError(400, f"Too many channels: {len(channels)}, limit {rules.MAX_CHANNELS}")
    return [_check_channel(channel) for channel in channels]


def _info_attributes(info: Any) -> dict[str, int]:
    """There are no subscribers here, so every requested count is zero."""
    if not isinstance(info, str) or not info:
        return {}
    return {name: 0 for name in info.split(",") if name in INFO_ATTRIBUTES}


def parse_trigger(body: Any, max_data_bytes: int = rules.MAX_DATA_BYTES
                  ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Validate a POST /events body; return one record per channel and the reply."""
    if not isinstance(body, dict):
        raise ApiError(400, "Request body must be a JSON object")
    channels = _channels_of(body)
    event = _check_event(body, max_data_bytes)
    reply: dict[str, Any] = {}
    if body.get("info"):
        attributes = _info_attributes(body["info"])
        reply = {"channels": {channel: attributes for channel in channels}}
    return [dict(event, channel=channel) for channel in channels], reply


def parse_batch(body: Any, max_data_bytes: int = rules.MAX_DATA_BYTES
                ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Validate a POST /batch_events body as a whole: Pusher accepts all or nothing."""
    if not isinstance(body, dict) or not isinstance(body.get("batch"), list):
        raise ApiError(400, "Request body must be an object with a batch list")
    batch = body["batch"]
    if len(batch) > rules.MAX_BATCH_EVENTS:
        raise ApiError(400, f"Batch too large: {len(batch)} events, limit {rules.MAX_BATCH_EVENTS}")
    records = []
    for item in batch:
        if not isinstance(item, dict):
            raise ApiError(400, "Batch items must be objects")
        channel = _check_channel(item.get("channel"))
        records.append(dict(_check_event(item, max_data_bytes), channel=channel))
    if any(isinstance(item, dict) and item.get("info") for item in batch):
        return records, {"batch": [_info_attributes(item.get("info")) for item in batch]}
    return records, {}



def channels_in(body: bytes) -> list[str]:
    """The channels a request names, read leniently (for per-channel faults); [] if none."""
    try:
        obj = json.loads(body)
    except ValueError:
        return []
    if not isinstance(obj, dict):
        return []
    items = obj["batch"] if isinstance(obj.get("batch"), list) else [obj]
    found = []
    for item in items:
        if isinstance(item, dict):
            channels = item.get("channels", [item.get("channel")])
            found.extend(c for c in channels if isinstance(c, str))
    return found
