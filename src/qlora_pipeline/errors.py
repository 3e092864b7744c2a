"""The one error type a stage reports as a clean one-line message."""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable

# Running out of room, as the OS says it in errno and in the messages that libraries pass on.
_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_NO_SPACE_TEXTS = tuple(os.strerror(code) for code in _NO_SPACE_ERRNOS)


class PipelineError(Exception):
    """Bad params, bad data or a bad source: the message names the key, or the file and row."""


def _no_space(exc: BaseException) -> BaseException | None:
    """The exception in `exc`'s chain that says the disk is full (or the file size limit reached), if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if getattr(exc, "errno", None) in _NO_SPACE_ERRNOS or any(text in str(exc) for text in _NO_SPACE_TEXTS):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main(); a PipelineError, or a full disk, becomes one line on stderr and exit status 2.
    Outputs are written atomically (outputs.py), so a stage stopped either way leaves the previous ones."""
    try:
        main()
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except Exception as exc:
        full = _no_space(exc)
        if full is None:
            raise
        where = getattr(full, "filename", None)
        print(f"error: no space left to write {where or 'the outputs'} ({full}); free some and rerun "
              "(the previous outputs are untouched)", file=sys.stderr)
        sys.exit(2)
