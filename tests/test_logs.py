"""--log-level (gridnode/logs.py): which events pass, and the filter put on a publisher's observers."""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import Factory
from twisted.logger import Logger, LogLevel, LogPublisher

from gridnode.logs import filter_levels, level_of


class LevelTests:
    def test_twisted_chatter_is_debug(self) -> None:
        """A factory's start and stop lines are debug, whatever level Twisted logs them at; other
        events keep theirs (legacy ones without a level: info)."""
        assert level_of({"log_format": "Starting factory {factory!r}", "log_level": LogLevel.info}) == LogLevel.debug
        assert level_of({"log_format": "Stopping factory {factory!r}", "log_level": LogLevel.info}) == LogLevel.debug
        assert level_of({"log_format": "job {job} accepted", "log_level": LogLevel.warn}) == LogLevel.warn
        assert level_of({"message": ("legacy",)}) == LogLevel.info

    def test_filter_on_every_observer(self) -> None:
        """At info: gridnode's info and warnings pass, a factory's start does not; at debug it does."""
        for level, chatter in (("info", False), ("debug", True)):
            publisher = LogPublisher()
            seen: list[dict[str, Any]] = []
            publisher.addObserver(seen.append)
            filter_levels(publisher, level)
            log = Logger(observer=publisher, namespace="gridnode.test")
            log.debug("a debug line")
            log.info("job {job} accepted", job="j1")
            log.warn("registry unreachable")
            Logger(observer=publisher).info("Starting factory {factory!r}", factory=Factory())
            formats = [e["log_format"] for e in seen]
            assert ("job {job} accepted" in formats and "registry unreachable" in formats)
            assert ("Starting factory {factory!r}" in formats) is chatter
            assert ("a debug line" in formats) is chatter
