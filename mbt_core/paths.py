"""Where the runtime keeps its state: ``$MBT_STATE_DIR`` (accepted versions, trust roots)."""

from __future__ import annotations

import os
from pathlib import Path


def default_state_dir() -> Path:
    """``$MBT_STATE_DIR``, else ``~/.local/state/mbt``: where accepted versions and roots live."""
    base = os.environ.get("MBT_STATE_DIR")
    return Path(base) if base else Path.home() / ".local" / "state" / "mbt"
