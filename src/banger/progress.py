"""Progress events: services report them through a callback; the daemon forwards them to the CLI."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class ProgressEvent:
    """One progress report: a step label, and optionally done/total counts in `unit`."""

    step: str
    done: int | None = None
    total: int | None = None
    unit: str = "B"
    message: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProgressEvent:
        return cls(
            step=str(data.get("step", "")),
            done=data.get("done"),
            total=data.get("total"),
            unit=str(data.get("unit", "B")),
            message=data.get("message"),
        )


Progress = Callable[[ProgressEvent], None]


def no_progress(_event: ProgressEvent) -> None:
    """A Progress sink that drops everything."""
