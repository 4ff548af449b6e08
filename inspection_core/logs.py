"""Process logging: one format for people (``text``) and one for log shippers (``json``, one object per line)."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "message"[, "exception"]}`` — what Loki, Elastic and Cloud Logging parse."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


_format = "text"  # what configure() last set: say() and JsonLines follow it


def configure(level: str = "INFO", fmt: str = "text") -> None:
    global _format
    _format = fmt
    logging.captureWarnings(True)  # Python warnings go through the same handler, not as plain lines
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if fmt == "json" else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)


def format_from_argv(argv: Sequence[str], environ: dict[str, str] | None = None) -> str:
    """``--log-format`` as the command line (or ``CFF_INSPECT_LOG_FORMAT``) gives it, before argparse has run: a
    usage error is written in the format asked for."""
    env = os.environ if environ is None else environ
    fmt = env.get("CFF_INSPECT_LOG_FORMAT", "text")
    for i, a in enumerate(argv):
        if a == "--log-format" and i + 1 < len(argv):
            fmt = argv[i + 1]
        elif a.startswith("--log-format="):
            fmt = a.partition("=")[2]
    return fmt if fmt in FORMATS else "text"


def set_format(fmt: str) -> None:
    """The format :func:`say` writes in, before :func:`configure` runs."""
    global _format
    _format = fmt


def say(message: str, *, level: int = logging.INFO, logger: str = "cff_inspect") -> None:
    """A status line for people on stderr, whatever the log level; under ``--log-format json`` one JSON object like
    every log record, so a log shipper never meets a plain line."""
    if _format == "json":
        record = logging.LogRecord(logger, level, __file__, 0, message, None, None)
        sys.stderr.write(JsonFormatter().format(record) + "\n")
        sys.stderr.flush()
    else:
        print(message, file=sys.stderr, flush=True)


class JsonLines:
    """A text stream that passes each line it is given to :func:`say` (progress lines under ``--log-format json``)."""

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line.strip():
                say(line)
        return len(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return False
