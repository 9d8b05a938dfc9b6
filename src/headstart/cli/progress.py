"""The progress bars of the CLI: a `headstart.progress.Progress` sink drawn with rich, on stderr."""

from __future__ import annotations

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from headstart.cli import render


class _RateColumn(ProgressColumn):
    """Items per second; rich's TransferSpeedColumn would format them as bytes."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.1f} it/s" if speed else "? it/s", style="progress.data.speed")


class ProgressBars:
    """A `headstart.progress.Progress` sink: one rich bar per library task (description, count, rate, ETA).

    Draws on stderr and only when stderr is a terminal, so CI logs and pipes stay clean. Use as a context
    manager so the live display is torn down even when the library raises.
    """

    def __init__(self) -> None:
        console = render.err_console()
        self._bars = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            _RateColumn(),
            TimeRemainingColumn(elapsed_when_finished=True),
            console=console,
            disable=not console.is_terminal,
        )
        self._task: TaskID | None = None

    def __enter__(self) -> ProgressBars:
        self._bars.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.finish()
        self._bars.stop()

    def start(self, task: str, total: int | None) -> None:
        self.finish()  # a task the library left open must not keep ticking under the next one
        self._task = self._bars.add_task(task, total=total)

    def advance(self, n: int = 1) -> None:
        if self._task is not None:
            self._bars.advance(self._task, n)

    def finish(self) -> None:
        if self._task is None:
            return
        task = next(t for t in self._bars.tasks if t.id == self._task)
        # Early stopping or an unknown total ends short of `total`: show the bar full rather than stuck.
        self._bars.update(self._task, total=task.completed)
        self._bars.stop_task(self._task)
        self._task = None
