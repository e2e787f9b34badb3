"""Progress bars that say where a long step is: a text after the bar, redrawn at most every
:data:`REDRAW_S` seconds (:func:`postfix_writer`), so that work inside one bar step is not silent."""

from __future__ import annotations

import time
from collections.abc import Callable

from tqdm.auto import tqdm

#: Least seconds between two redraws of a bar's text.
REDRAW_S = 1.0


def postfix_writer(bar: tqdm) -> Callable[[str], None]:
    """``say(text)``: ``text`` after ``bar`` (its postfix), redrawn at most every :data:`REDRAW_S`
    seconds; the first call draws at once."""
    every, last = REDRAW_S, float("-inf")

    def say(text: str) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= every:
            last = now
            bar.set_postfix_str(text, refresh=True)

    return say
