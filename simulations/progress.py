"""Progress bars for long work (rich), silent when asked or when output is not a terminal."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


@contextmanager
def progress_bar(total: int, description: str, enabled: bool = True) -> Iterator[Callable[[str], None]]:
    """Yield ``advance(status="", steps=1)``: steps done, with a short status line."""
    if not enabled:
        yield lambda status="", steps=1: None
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
    )
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task(description, total=total, status="")

        def advance(status: str = "", steps: int = 1) -> None:
            progress.update(task, advance=steps, status=status)

        yield advance
        progress.update(task, total=progress.tasks[0].completed)
