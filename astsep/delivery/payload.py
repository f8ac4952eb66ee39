"""The backend's URL and JSON body: :func:`validate_url` and :func:`build_payload`.

The body is exactly what the reference backend (``Bentlytrucker/ast_source_sep``,
``POST /sound-events/``) takes; nothing here touches the network or the disk.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any, Mapping
from urllib.parse import urlsplit, urlunsplit

from ..errors import BackendError

MIN_DECIBEL = -120.0  # dBFS sent in place of -inf / NaN (digital silence) so the JSON stays valid
PLACEHOLDER = "string"  # what the reference sends for sound_icon and location_image_url
SKIPPED_CATEGORY = "other"  # events of this category are never sent


def redact_url(url: str) -> str:
    """``url`` with any ``user:password@`` part replaced by ``***@`` (for messages and logs)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit((parts.scheme, f"***@{host}", parts.path, parts.query, parts.fragment))


def validate_url(url: str) -> str:
    """Check that ``url`` is an ``http://`` or ``https://`` URL with a host; return it stripped.

    Raises :class:`~astsep.errors.BackendError` with a one-line message otherwise (any credentials
    in the URL are redacted from the message).
    """
    if not isinstance(url, str) or not url.strip():
        raise BackendError("invalid backend URL: empty (expected http://host[:port]/path or https://...)")
    url = url.strip()
    shown = redact_url(url)
    if any(c.isspace() for c in url):
        raise BackendError(f"invalid backend URL {shown!r}: contains whitespace")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a non-numeric / out-of-range port
    except ValueError as exc:
        raise BackendError(f"invalid backend URL {shown!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        hint = ""
        if "://" not in url:
            hint = f" (did you mean 'http://{shown}'?)"
        what = f"scheme {scheme!r} is not supported" if scheme and "://" in url else "no http:// or https:// scheme"
        raise BackendError(f"invalid backend URL {shown!r}: {what}; use http:// or https://{hint}")
    if not parts.hostname:
        raise BackendError(f"invalid backend URL {shown!r}: no host")
    return url


def parse_iso_time(text: str) -> datetime:
    """An ISO-8601 time as an aware datetime: ``Z`` or an offset, else UTC. Raises ``ValueError``."""
    t = text.strip()
    if t.endswith(("Z", "z")):
        t = t[:-1] + "+00:00"
    when = datetime.fromisoformat(t)
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _format_time(occurred_at: datetime | str | float | None) -> str:
    """ISO-8601 UTC with second resolution, ``YYYY-MM-DDTHH:MM:SSZ``.

    ``None`` means now; a float is seconds since the Unix epoch; a naive datetime is taken as UTC;
    a string is parsed as ISO-8601 (``Z`` suffix allowed) and re-formatted.
    """
    if occurred_at is None:
        dt = datetime.now(timezone.utc)
    elif isinstance(occurred_at, datetime):
        dt = occurred_at if occurred_at.tzinfo else occurred_at.replace(tzinfo=timezone.utc)
    elif isinstance(occurred_at, (int, float)) and not isinstance(occurred_at, bool):
        if not math.isfinite(occurred_at):
            raise BackendError(f"occurred_at must be a finite epoch time, got {occurred_at!r}")
        dt = datetime.fromtimestamp(float(occurred_at), tz=timezone.utc)
    elif isinstance(occurred_at, str):
        try:
            dt = parse_iso_time(occurred_at)
        except ValueError:
            raise BackendError(f"occurred_at is not an ISO-8601 time: {occurred_at!r}") from None
    else:
        raise BackendError(f"occurred_at must be a datetime, ISO string or epoch seconds, got {type(occurred_at).__name__}")
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _finite_decibel(level_dbfs: Any) -> float:
    """Level in dBFS as a finite float rounded to 0.01 dB: NaN and -inf become :data:`MIN_DECIBEL`,
    +inf becomes 0.0 (full scale)."""
    try:
        value = float(level_dbfs)
    except (TypeError, ValueError):
        return MIN_DECIBEL
    if math.isnan(value) or value == -math.inf:
        return MIN_DECIBEL
    if value == math.inf:
        return 0.0
    return round(value, 2)


def _angle(angle: Any) -> int:
    """Direction of arrival in whole degrees, wrapped into 0..359."""
    try:
        value = float(angle)
    except (TypeError, ValueError):
        raise BackendError(f"angle must be a number of degrees, got {angle!r}") from None
    if not math.isfinite(value):
        raise BackendError(f"angle must be finite, got {angle!r}")
    return int(round(value)) % 360


def _user_id(user_id: Any) -> int:
    """``user_id`` as the int the reference backend takes; a string of digits is converted."""
    if isinstance(user_id, bool):
        raise BackendError(f"user_id must be an integer, got {user_id!r}")
    if isinstance(user_id, int):
        return user_id
    if isinstance(user_id, str) and user_id.strip().lstrip("-").isdigit():
        return int(user_id.strip())
    raise BackendError(f"user_id must be an integer, got {user_id!r}")


def build_payload(
    event: Mapping[str, Any],
    *,
    user_id: int | str,
    angle: float,
    occurred_at: datetime | str | float | None = None,
    sound_icon: str = PLACEHOLDER,
    location_image_url: str = PLACEHOLDER,
) -> dict[str, Any]:
    """The reference backend's JSON body for one event record.

    Fields (exactly these, nothing else):

    * ``user_id`` – an int, as the reference backend takes it (``"42"`` is sent as ``42``);
    * ``sound_type`` – ``event["category"]`` (``danger`` / ``help`` / ``warning`` / ``other``);
    * ``sound_detail`` – ``event["label"]`` (the AudioSet class name);
    * ``angle`` – direction of arrival in degrees, rounded and wrapped into 0..359;
    * ``occurred_at`` – ``YYYY-MM-DDTHH:MM:SSZ`` in UTC, now when ``occurred_at`` is None;
    * ``sound_icon`` / ``location_image_url`` – ``"string"`` by default, as the reference sends;
    * ``decibel`` – ``event["level_dbfs"]`` in dBFS as a finite float (-inf / NaN → -120.0).

    Raises :class:`~astsep.errors.BackendError` when the event lacks ``category`` or ``label`` or
    the angle / time cannot be interpreted.
    """
    missing = [k for k in ("category", "label") if k not in event]
    if missing:
        raise BackendError(f"event {event.get('event_id', '?')!r} lacks {', '.join(missing)}")
    return {
        "user_id": _user_id(user_id),
        "sound_type": str(event["category"]),
        "sound_detail": str(event["label"]),
        "angle": _angle(angle),
        "occurred_at": _format_time(occurred_at),
        "sound_icon": sound_icon,
        "location_image_url": location_image_url,
        "decibel": _finite_decibel(event.get("level_dbfs")),
    }
