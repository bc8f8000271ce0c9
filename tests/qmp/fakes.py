"""A stand-in for Machine with just what the monitor touches, for tests without KVM."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class State(enum.Enum):
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


@dataclass
class FakeConfig:
    name: str = "fake"
    num_cpus: int = 2
    no_reboot: bool = False
    devices: list[Any] = field(default_factory=list)


class FakeMachine:
    def __init__(self) -> None:
        self.config = FakeConfig()
        self.runstate = State.RUNNING
        self.prelaunch = False
        self.observers: list[Any] = []
        self.posted: list[tuple[str, str]] = []
        self.powerdowns = 0

    def _tell(self, kind: str, detail: str = "") -> None:
        for o in list(self.observers):
            o(kind, detail)

    async def pause(self) -> None:
        if self.runstate is State.RUNNING:
            self.runstate = State.PAUSED
            self._tell("stop")

    async def resume(self) -> None:
        if self.runstate is State.PAUSED:
            self.runstate = State.RUNNING
            self._tell("resume")

    def post_event(self, kind: str, detail: str = "") -> None:
        self.posted.append((kind, detail))
        self._tell(kind, detail)

    async def request(self, kind: str, detail: str = "") -> None:
        self.post_event(kind, detail)

    def powerdown(self) -> None:
        self.powerdowns += 1
