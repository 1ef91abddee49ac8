"""The record base of fedtide's run files: a frozen dataclass whose `to_dict()` is exactly its JSON.

A record's `to_dict()` is exactly the JSON the file holds (same keys, same order, an
optional section left out when absent), so run folders written before the records
existed read and write back byte for byte. Records import nothing but the standard
library: readers (the report, the CLI) use them without torch.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, ClassVar, TypeVar

R = TypeVar("R", bound="Record")


class Record:
    """The file's keys are the record's fields, in order; the `_OPTIONAL` ones are left out while None.

    A nested section may be given typed or in its JSON form (a dict, or a list or map of
    them): `from_dict` hands the file's sections to the constructor as they are, and the
    record holds them typed either way.
    """

    _TYPE: ClassVar[str | None] = None  # the line's "type" in metrics.jsonl
    _OPTIONAL: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict[str, Any]:
        raw: dict[str, Any] = {} if self._TYPE is None else {"type": self._TYPE}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None or f.name not in self._OPTIONAL:
                raw[f.name] = plain(value)
        return raw

    @classmethod
    def from_dict(cls: type[R], raw: dict[str, Any]) -> R:
        """Keys this version does not know (a later version's) are ignored rather than refused."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})


def plain(value: Any) -> Any:
    """JSON values, a nested record through its own `to_dict` (`asdict` would write absent optional keys as null)."""
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def typed(value: R | dict[str, Any] | None, record: type[R]) -> R | None:
    return record.from_dict(value) if isinstance(value, dict) else value


def typed_list(values: list[R | dict[str, Any]] | None, record: type[R]) -> list[R] | None:
    return None if values is None else [typed(v, record) for v in values]


def set_field(record: Record, name: str, value: Any) -> None:
    """Assign in __post_init__ of a frozen record."""
    object.__setattr__(record, name, value)
