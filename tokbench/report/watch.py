"""``tokbench report --watch SECONDS``: rebuild the page in a loop while a sweep runs."""

from __future__ import annotations

import logging
import time
from typing import Callable, Optional

from tokbench.errors import TokbenchError

log = logging.getLogger("tokbench.report")


def watch(build: Callable[[], object], seconds: float, *, max_iterations: Optional[int] = None,
          sleep: Callable[[float], None] = time.sleep) -> int:
    """Call ``build`` every ``seconds`` until Ctrl-C (or ``max_iterations`` builds, for tests);
    return the number of builds that succeeded.

    The first build must succeed: a wrong sweep id or an unreachable store is the user's to
    fix, so its error propagates. Later failures (a tracking server restarting while the
    sweep runs) are logged and retried on the next round instead of ending the watch.
    """
    if seconds <= 0:
        raise TokbenchError(f"--watch {seconds:g}: expected a positive number of seconds")
    built = iteration = 0
    try:
        while max_iterations is None or iteration < max_iterations:
            iteration += 1
            try:
                result = build()
                built += 1
                log.info("report rebuilt: %s (next in %g s, Ctrl-C stops)", result, seconds)
            except Exception as exc:  # noqa: BLE001
                if built == 0:
                    raise
                log.warning("report rebuild %d failed (%s); trying again in %g s", iteration, exc, seconds)
            if max_iterations is None or iteration < max_iterations:
                sleep(seconds)
    except KeyboardInterrupt:
        log.info("watch stopped after %d build(s)", built)
    return built
