"""Progress on stderr: one status line redrawn in place (a load's tensor count), and whole
lines (each compiled program) that other threads may print meanwhile. A whole line goes above
the status line, which is drawn again under it (as tqdm.write does), so a server that compiles
while it loads keeps both readable."""

from __future__ import annotations

import sys
import threading

_lock = threading.Lock()
_status = ""  # the status line drawn now, without its newline ("": none)


def status(text: str) -> None:
    """Draws `text` as the status line, over the one before."""
    global _status
    with _lock:
        print(f"\r{text}".ljust(len(_status) + 1), end="", file=sys.stderr, flush=True)
        _status = text


def end_status() -> None:
    """Ends the status line where it stands: what follows goes under it."""
    global _status
    with _lock:
        if _status:
            print(file=sys.stderr, flush=True)
        _status = ""


def line(text: str) -> None:
    """Prints `text` as a line of its own, above the status line if one is drawn."""
    with _lock:
        if _status:
            print(f"\r{text}".ljust(len(_status) + 1), file=sys.stderr)
            print(_status, end="", file=sys.stderr, flush=True)
        else:
            print(text, file=sys.stderr, flush=True)
