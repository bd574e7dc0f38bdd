"""How a failed user action is shown in 3D Slicer (slicer.util only: no Qt)."""

from __future__ import annotations

import contextlib
import logging


@contextlib.contextmanager
def user_action(message: str, wait_cursor: bool = False):
    """One error dialog for a failed user action, and no exception out of a Qt slot. slicer.util's
    tryWithErrorDisplay(message=None, show=True, waitCursor=False) shows the dialog and then re-raises
    (Base/Python/slicer/util.py, 5.10 to main), so nested uses showed two dialogs and a traceback: the
    outermost action catches what it showed. A wait cursor only around work that shows no dialog (Slicer's
    confirmations and pip install must not sit under it)."""
    import slicer.util

    try:
        with slicer.util.tryWithErrorDisplay(message, waitCursor=wait_cursor):
            yield
    except Exception as exc:  # shown; kept in Slicer's log at ERROR too (with its traceback), never only at DEBUG
        logging.error("IrisSegment: %s %s", message, exc, exc_info=True)
