"""How the `lorank` command ends: a user error as one line on stderr (exit 2), Ctrl-C or
SIGTERM as one line after the finished work is kept (exit 130 or 143)."""

from __future__ import annotations

import signal
import sys
import threading
from typing import NoReturn

from rich.text import Text

from lorank.cli_options import err_console
from lorank.errors import LorankError

INTERRUPTED = "interrupted: finished work is kept; run the same command again to continue"


class _Signals:
    """The stop signal received, if any (SIGTERM is turned into a KeyboardInterrupt)."""

    received: int | None = None


def _stop_like_ctrl_c(signum: int, frame) -> None:
    """SIGTERM handler: stop the way Ctrl-C does, so the finally blocks and context managers
    that keep finished work run (Python's default for SIGTERM ends the process at once)."""
    _Signals.received = signum
    raise KeyboardInterrupt(f"signal {signum}")


def _interrupted(signum: int) -> NoReturn:
    """One line on stderr, then the shell's exit code for the signal (130, SIGTERM 143)."""
    name = "" if signum == signal.SIGINT else f" by {signal.Signals(signum).name}"
    err_console.print(INTERRUPTED.replace("interrupted", f"interrupted{name}", 1),
                      soft_wrap=True, markup=False, highlight=False)
    sys.exit(128 + signum)


def run_app(app) -> None:
    """Run the typer `app`: user errors become one line on stderr and exit code 2; Ctrl-C or
    SIGTERM keep finished work and exit with 130 or 143 after one line."""
    _Signals.received = None
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _stop_like_ctrl_c) if on_main_thread else None
    try:
        _main(app)
    finally:
        if on_main_thread:  # None: a handler set outside Python, which cannot be put back
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _main(app) -> None:
    try:
        code = app(standalone_mode=False)
        # typer turns Ctrl-C (and typer.Exit) into a returned exit code when not standalone
        if code == 130:
            _interrupted(_Signals.received or signal.SIGINT)
        if isinstance(code, int) and code:
            sys.exit(code)
    except LorankError as err:
        err_console.print(Text("error: ", style="red") + Text(str(err)), soft_wrap=True)
        sys.exit(2)
    except FileNotFoundError as err:
        err_console.print(Text("error: ", style="red") + Text(f"file not found: {err.filename}"),
                          soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        _interrupted(_Signals.received or signal.SIGINT)
    except Exception as err:  # click usage errors (typer vendors click) show themselves
        if hasattr(err, "show") and hasattr(err, "exit_code"):
            err.show()
            sys.exit(2)
        if type(err).__name__ == "Abort":
            sys.exit(1)
        raise
