"""Logging setup: plain lines for people, JSON lines when NIM_JSONL_LOGGING is set (for log pipelines)."""

from __future__ import annotations

import json
import logging
import sys
import time

from trtllm_peft.settings import Settings


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(settings: Settings) -> None:
    """Configure the root logger once, from NIM_LOG_LEVEL and NIM_JSONL_LOGGING."""
    handler = logging.StreamHandler(sys.stderr)
    if settings.jsonl_logging:
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    level = "DEBUG" if settings.log_level == "TRACE" else settings.log_level
    logging.basicConfig(level=level, handlers=[handler], force=True)
