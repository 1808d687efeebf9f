"""
What the command line prints: text lines, or JSON lines only (``--json``: every
line on stdout is one JSON object, errors included, and stderr stays empty);
progress bars, one per file, only on a terminal.
"""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

from gridnode.client.failures import as_json, as_line, printable
from gridnode.errors import GridnodeError


class Output:
    def __init__(self, as_json: bool, stdout: TextIO | None = None, stderr: TextIO | None = None) -> None:
        self.as_json = as_json
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        self.tty = self.stdout.isatty() and not as_json
        self.bars: dict[int, Any] = {}
        #: set once the user stopped the run: what the cancelled work reports is not shown
        self.quiet = False

    def _print(self, text: str, to: TextIO) -> None:
        if self.quiet:
            return
        if self.bars:
            from tqdm import tqdm

            tqdm.write(text, file=to)
        else:
            print(text, file=to, flush=True)

    def event(self, kind: str, text: str | None, **fields: Any) -> None:
        """An event: a JSON line with ``--json``, else ``text`` (None: nothing in text mode)."""
        if self.as_json:
            self._print(json.dumps({"event": kind, **fields}, sort_keys=True), self.stdout)
        elif text is not None:
            self._print("\n".join(printable(line) for line in text.split("\n")), self.stdout)

    def failed(self, error: GridnodeError, **fields: Any) -> None:
        """A failure: one line on stderr, or one JSON object on stdout with ``--json``."""
        if self.as_json:
            self._print(json.dumps(as_json(error, **fields), sort_keys=True), self.stdout)
        else:
            self._print(as_line(error), self.stderr)

    def progress(self, slot: int, label: str, done: float, total: float, unit: str = "B") -> None:
        """Bar number ``slot`` (one per file) shows ``label`` at done/total; nothing off a terminal."""
        if not self.tty or self.quiet:
            return
        from tqdm import tqdm

        bar = self.bars.get(slot)
        if bar is not None and bar.desc != label:  # a new phase (uploading, converting): a new bar
            bar.close()
            bar = None
        if bar is None:
            # a percentage has no rate worth showing
            rate = "" if unit == "%" else ", {rate_fmt}"
            bar = self.bars[slot] = tqdm(total=total, desc=label, unit=unit, unit_scale=unit == "B",
                                         leave=False, position=slot, file=self.stdout,
                                         bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}" + rate + "]")
        bar.total = total
        bar.n = done
        bar.refresh()

    def close(self, slot: int | None = None) -> None:
        for key in [slot] if slot is not None else list(self.bars):
            bar = self.bars.pop(key, None) if key is not None else None
            if bar is not None:
                bar.close()
