"""Logging, configured once per process: every role, the supervisor and the tools write
`TIME NAME LEVEL message` lines to stderr (a role's stderr is its log file in dev and cluster mode)."""
from __future__ import annotations

import logging
import os

_configured = False


def setup(name: str, level: str | None = None) -> None:
    """Configure the root logger for process `name` (ps0, learner3, supervisor ...), once; GORILA_LOG
    (or `level`) sets the level. Later calls change nothing."""
    global _configured
    if _configured:
        return
    _configured = True
    level = (level or os.environ.get("GORILA_LOG") or "INFO").upper()
    logging.basicConfig(level=getattr(logging, level, logging.INFO),
                        format=f"%(asctime)s {name} %(levelname)s %(message)s")
