"""Progress of one group, reported from the group program's `on_window` host callback.

On a terminal a tqdm bar; elsewhere (CI, nohup, `2> log`) one line per record window,
at most one every `min_interval` seconds, so a long group is never silent and a log
never floods. Either way the callback answers the program's question "stop now?" with
`experiments.interrupt.requested()`.

Example:
  >>> report = WindowProgress(total=40_000, every=100, desc="batch 16", mode="lines")
  >>> program = make_group_program(..., on_window=report)
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

from experiments import interrupt

MODES = (None, "bar", "lines")


class WindowProgress:
    """`on_window(windows_done, running) -> stop` for a group of `total` steps in
    windows of `every`; `mode` is "bar", "lines" or None (silent)."""

    def __init__(self, total: int, every: int, desc: str, mode: str | None, *,
                 min_interval: float = 5.0, stream=None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.total, self.every, self.desc, self.mode = total, every, desc, mode
        self.min_interval = min_interval
        self.stream = sys.stderr if stream is None else stream
        self.start = time.perf_counter()
        self.last_line = -float("inf")
        self.bar = (tqdm(total=total, desc=desc, unit="step", leave=False, file=self.stream)
                    if mode == "bar" else None)

    def __call__(self, windows_done: int, running: int) -> bool:
        # Runs inside an XLA host callback: it must never raise.
        try:
            self._report(min(windows_done * self.every, self.total), running)
        except Exception:  # noqa: BLE001  (a broken stderr must not crash XLA)
            pass
        return interrupt.requested()

    def _report(self, done: int, running: int) -> None:
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            return
        if self.mode != "lines":
            return
        now = time.perf_counter()
        if done < self.total and now - self.last_line < self.min_interval:
            return
        self.last_line = now
        print(f"basin: {self.desc}: step {done}/{self.total} "
              f"({100 * done / max(self.total, 1):.0f}%), {running} member(s) running, "
              f"{now - self.start:.1f}s", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
