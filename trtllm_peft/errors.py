"""Typed errors. Every failure a user can cause is one of these, with a message meant for them.

`http_status` is the one place where an error meets HTTP; the server maps it, nothing else does.
"""

from __future__ import annotations


class TrtllmPeftError(Exception):
    """Base of every error this package raises on purpose."""

    http_status = 500


class SettingsError(TrtllmPeftError):
    """A NIM_* variable (or a command-line flag) has a value we cannot use."""

    http_status = 500


class AdapterError(TrtllmPeftError):
    """An adapter cannot be read or does not fit the engine.

    Holds every problem found, not just the first, so one look at the message says all that is wrong.
    """

    http_status = 422

    def __init__(self, source: str, problems: list[str] | str):
        self.source = _printable(str(source))
        self.problems = [_printable(p) for p in ([problems] if isinstance(problems, str) else problems)]
        super().__init__(self._render())

    def _render(self) -> str:
        if len(self.problems) == 1:
            return f"{self.source}: {self.problems[0]}"
        lines = "\n".join(f"  - {p}" for p in self.problems)
        return f"{self.source}: {len(self.problems)} problems:\n{lines}"


def _printable(text: str) -> str:
    """`text` as valid UTF-8: file names with undecodable bytes (lone surrogates) are escaped, so that the
    message can go into a JSON answer or a log line."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class AdapterFormatError(AdapterError):
    """The files are not a readable adapter of any format we know (corrupt, truncated, unsafe, empty)."""


class AdapterIncompatibleError(AdapterError):
    """The adapter was read but does not fit the engine (rank, modules, layers, dims)."""


class EngineError(TrtllmPeftError):
    """An engine directory is missing, incomplete or was built differently from what is asked."""


class InvalidRequestError(TrtllmPeftError):
    """The engine refused a request as malformed before running it (bad sampling values, bad tensors)."""

    http_status = 400
