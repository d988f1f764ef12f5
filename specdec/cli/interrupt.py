"""Ending the command line as Ctrl-C ends a program; imports nothing heavy, so it works while torch imports."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from typing import NoReturn


def exit_interrupted() -> NoReturn:
    """End the process as a program stopped by Ctrl-C ends: killed by SIGINT, once what was printed is flushed.

    A shell then shows status 130 and stops the loop or script that ran the command; after a plain exit
    code 130 bash went on with the next command, so Ctrl-C could not stop ``for p in ...; do specdec-local
    generate "$p"; done``. (Python does the same for a Ctrl-C nobody catches.) Exit code 130 where there
    are no POSIX signals or this is not the main thread.
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    logging.shutdown()
    if os.name == "posix" and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    sys.exit(130)
