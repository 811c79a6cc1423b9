"""What every command-line tool does with an expected failure: one line on stderr, a distinct exit code.

Tracebacks are for bugs. A mistake a user can make (bad option, bad input, an output that would
destroy something) raises :class:`UserError` with the code of its kind; :func:`run_cli` prints
``error: <message>`` and exits with that code. argparse's own usage errors exit with 2.
"""

from __future__ import annotations

import sys
from enum import IntEnum
from typing import Callable


class ExitCode(IntEnum):
    OK = 0
    USAGE = 2  # argparse: unknown or malformed options, conflicting options
    INPUT = 3  # the text, prompt or other input file cannot be used
    MODEL = 4  # the checkpoint or engine cannot be used
    OUTPUT = 5  # the output cannot be written, or writing it would destroy something
    NUMERIC = 6  # the model produced NaN/inf


class UserError(Exception):
    """An expected failure with a message that says what was wrong and what to do."""

    code = ExitCode.INPUT

    def __init__(self, message: str, code: ExitCode | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class OutputError(UserError):
    """An output path that cannot or must not be written."""

    code = ExitCode.OUTPUT


def run_cli(main: Callable[[], int | None], expected: dict[type[BaseException], ExitCode] | None = None) -> int:
    """Run ``main``; a :class:`UserError` (or an ``expected`` exception type) becomes one stderr line.

    ``expected`` maps other exception types a tool treats as user mistakes to their exit codes.
    """
    expected = expected or {}
    try:
        return int(main() or 0)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return int(err.code)
    except tuple(expected) as err:
        code = next(code for kind, code in expected.items() if isinstance(err, kind))
        print(f"error: {err}", file=sys.stderr)
        return int(code)
