"""Progress bars (tqdm, on stderr, only on a terminal), one line per running pull.

huggingface_hub asks for a bar per file through `tqdm_class`; ngcsdk reports bytes through a callback.
Both end up here, at the line (`position`) the pull was given, so parallel pulls do not overwrite each
other.
"""

from __future__ import annotations

import threading

from tqdm.auto import tqdm


class Progress:
    """The progress display of one pull. `enabled=False` (--no-progress) shows nothing."""

    def __init__(self, label: str, *, position: int = 0, enabled: bool = True):
        self.label, self.position, self.enabled = label, position, enabled
        self._bar: tqdm | None = None
        self._lock = threading.Lock()

    def _new_bar(self, desc: str, total: int | None, initial: int = 0) -> tqdm:
        return tqdm(
            desc=f"{self.label}: {desc}" if desc else self.label,
            total=total,
            initial=initial,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            position=self.position,
            leave=False,
            dynamic_ncols=True,
            disable=None if self.enabled else True,  # None: tqdm shows bars only on a terminal
        )

    def file_bar(self, *, desc: str = "", total: int | None = None, initial: int = 0, **_: object) -> tqdm:
        """A `tqdm_class` for huggingface_hub's http_get: one bar per file, `initial` = bytes resumed."""
        return self._new_bar(desc, total, initial)

    def ngc_callback(
        self,
        completed_bytes: int,
        failed_bytes: int,
        total_bytes: int,
        completed_count: int,
        failed_count: int,
        total_count: int,
    ) -> None:
        """ngcsdk's `progress_callback_func`: called from its monitor thread with running totals."""
        with self._lock:
            if self._bar is None:
                self._bar = self._new_bar(f"{total_count} files", total_bytes)
            self._bar.n = completed_bytes
            self._bar.set_postfix_str(f"{completed_count}/{total_count} files", refresh=False)
            self._bar.refresh()

    def close(self) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
