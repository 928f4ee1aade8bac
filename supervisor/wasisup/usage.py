"""Bad usage, told in one line: the exception, argparse made to raise it, and the checks that
must run before gunicorn is imported (it reads its environment and our argv at import)."""

from __future__ import annotations

import argparse
import difflib
import os
from typing import NoReturn, Sequence


ENV_ARGS = "WASISUP_CMD_ARGS"  # extra command-line arguments, read before the real ones


class UsageError(Exception):
    """Bad configuration: reported as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse, with errors raised as UsageError (one line, exit 2) instead of printed."""

    def error(self, message: str) -> NoReturn:
        hint = ""
        if message.startswith("unrecognized arguments: "):
            unknown = message.split()[2]
            close = difflib.get_close_matches(unknown, self._option_string_actions, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
        raise UsageError(f"{message} ({hint}see {self.prog} --help)")


def check_utf8(text: str, what: str) -> None:
    """ValueError unless ``text`` is valid UTF-8; a byte the system passed that is not (Python
    holds it as a lone surrogate) is named as the byte it was."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        piece = text[exc.start:exc.end]
        try:
            shown = "byte 0x" + piece.encode("utf-8", "surrogateescape").hex()
        except UnicodeEncodeError:
            shown = ascii(piece)
        raise ValueError(f"{what} is not valid UTF-8 ({shown} at character {exc.start})") from None


def check_startup(argv: Sequence[str]) -> None:
    """What gunicorn would otherwise fail on with a traceback as it is imported: a command line
    that is not UTF-8 (setproctitle reads it), $WEB_CONCURRENCY and $PORT (its defaults)."""
    for index, arg in enumerate(argv, 1):
        try:
            check_utf8(arg, f"argument {index} ({arg!r})")
        except ValueError as exc:
            raise UsageError(f"{exc}: give file names and values in UTF-8") from None
    workers = os.environ.get("WEB_CONCURRENCY")
    if workers is not None and not (workers.strip().isdigit() and int(workers) >= 1):
        raise UsageError(f"$WEB_CONCURRENCY: give a whole number of at least 1, not {workers!r} "
                         "(or unset it)")
    port = os.environ.get("PORT")
    if port is not None and not (port.strip().isdigit() and int(port) <= 65535):
        raise UsageError(f"$PORT: give a port number (0-65535), not {port!r} (or unset it)")
    try:
        check_utf8(os.environ.get(ENV_ARGS, ""), f"${ENV_ARGS}")
    except ValueError as exc:
        raise UsageError(f"{exc}: give values in UTF-8") from None
