"""Output conventions: --json, tables, and progress (rich bars on a TTY, plain lines otherwise)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import click

from banger.progress import ProgressEvent


def emit_json(value: Any) -> None:
    """Print a value as indented JSON on stdout."""
    click.echo(json.dumps(value, indent=2, default=str))


def table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]], empty: str = "nothing here") -> None:
    """Print rows as an aligned plain-text table; columns are (key, header)."""
    if not rows:
        click.echo(empty)
        return
    cells = [[str(r.get(k, "") if r.get(k) is not None else "-") for k, _ in columns] for r in rows]
    headers = [h for _, h in columns]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    click.echo("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for c in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)).rstrip())


def kv(pairs: Sequence[tuple[str, Any]]) -> None:
    """Print key: value lines, aligned."""
    width = max((len(k) for k, _ in pairs), default=0)
    for k, v in pairs:
        click.echo(f"{k + ':':<{width + 1}} {v if v is not None else '-'}")


class ProgressRenderer:
    """Turns ProgressEvents into a rich progress bar (TTY) or throttled plain lines (pipes, CI)."""

    def __init__(self, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self._progress: Any = None
        self._tasks: dict[str, Any] = {}
        self._last_line: dict[str, float] = {}
        self._started: dict[str, float] = {}
        self._last_step: str | None = None

    def __enter__(self) -> ProgressRenderer:
        if self.enabled and self.tty:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def __call__(self, event: ProgressEvent) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._rich(event)
        else:
            self._plain(event)

    def _rich(self, ev: ProgressEvent) -> None:
        task = self._tasks.get(ev.step)
        if task is None:
            task = self._progress.add_task(ev.step, total=ev.total)
            self._tasks[ev.step] = task
        self._progress.update(task, completed=ev.done or 0, total=ev.total)
        if ev.message:
            self._progress.console.print(ev.message)

    def _plain(self, ev: ProgressEvent) -> None:
        now = time.monotonic()
        first = ev.step != self._last_step
        finished = ev.total is not None and ev.done == ev.total
        if not first and not finished and now - self._last_line.get(ev.step, 0.0) < 2.0 and not ev.message:
            return
        self._last_step = ev.step
        self._last_line[ev.step] = now
        started = self._started.setdefault(ev.step, now)
        text = ev.step
        if ev.done is not None:
            text += f": {_amount(ev.done, ev.unit)}"
            if ev.total:
                text += f" / {_amount(ev.total, ev.unit)} ({100 * ev.done // max(ev.total, 1)}%)"
            elapsed = now - started
            if ev.unit == "B" and elapsed > 0.5 and ev.done > 0:
                rate = ev.done / elapsed
                text += f", {_amount(int(rate), 'B')}/s"
                if ev.total and ev.done < ev.total:
                    text += f", ETA {int((ev.total - ev.done) / rate)}s"
        if ev.message:
            text += f" - {ev.message}"
        click.echo(text, err=True)


def _amount(n: int, unit: str) -> str:
    if unit == "B":
        from banger.fsutil import human_size

        return human_size(n)
    return f"{n} {unit}".rstrip()


def progress_notify(renderer: Callable[[ProgressEvent], None]) -> Callable[[str, dict[str, Any]], None]:
    """Adapt a renderer to the RPC client's notification callback."""

    def on_notify(method: str, params: dict[str, Any]) -> None:
        if method == "$/progress":
            renderer(ProgressEvent.from_json(params.get("event", {})))

    return on_notify
