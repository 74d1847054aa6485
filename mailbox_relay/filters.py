"""Which messages of an import to send: --since/--until on Date:, --label/--exclude-label on
Gmail Takeout's X-Gmail-Labels. Pure: header lines in, a yes or no out."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import FrozenSet, Optional, Sequence

from mailbox_relay.message import field_values


def parse_date(value: str) -> datetime:
    """An ISO date for --since/--until (2024-01-31, 2024-01-31T12:00, ...); UTC unless it says."""
    try:
        date = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"{value!r} is not a date such as 2024-01-31, 2024-01-31T12:00 or 2024-01-31T12:00+02:00"
        ) from None
    return date if date.tzinfo else date.replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class Filters:
    """--since/--until on the Date header, --label/--exclude-label on X-Gmail-Labels."""

    since: Optional[datetime] = None
    until: Optional[datetime] = None
    labels: FrozenSet[str] = frozenset()
    exclude_labels: FrozenSet[str] = frozenset()

    @property
    def active(self) -> bool:
        return bool(self.since or self.until or self.labels or self.exclude_labels)

    def keep(self, header: Sequence[bytes]) -> bool:
        if self.labels or self.exclude_labels:
            labels = message_labels(header)
            if self.labels and not labels & self.labels:
                return False
            if labels & self.exclude_labels:
                return False
        if self.since or self.until:
            date = message_date(header)
            if date is None:
                return True  # undated: kept, since we cannot tell
            if (self.since and date < self.since) or (self.until and date >= self.until):
                return False
        return True


def message_labels(header: Sequence[bytes]) -> FrozenSet[str]:
    labels = set()
    for value in field_values(header, b"x-gmail-labels"):
        for label in value.decode("utf-8", "replace").split(","):
            labels.add(label.strip().strip('"').casefold())
    return frozenset(labels)


def message_date(header: Sequence[bytes]) -> Optional[datetime]:
    from email.utils import parsedate_to_datetime

    for value in field_values(header, b"date"):
        try:
            date = parsedate_to_datetime(value.decode("ascii", "replace"))
        except (TypeError, ValueError, IndexError, OverflowError):  # junk, or a year out of range
            return None
        return date if date.tzinfo else date.replace(tzinfo=timezone.utc)
    return None
