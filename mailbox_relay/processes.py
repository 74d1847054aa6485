"""Other processes, asked about by pid: cheap to import."""

from __future__ import annotations

import os
from typing import Optional


def pid_alive(pid: Optional[int]) -> bool:
    """Whether `pid` still runs (a process killed with -9 leaves its pid behind in our records).
    Another user's process counts as alive."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
