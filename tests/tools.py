"""External tools the tests run as operators do (promtool, hadolint, kubernetes-validate, ...).

CI (``CI=true``, as ``.ci/run`` runs) installs every one of them, so a missing tool there is a
failure: a check that silently skipped would pass CI while checking nothing. Elsewhere the test
is skipped, saying what to install.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest


def external_tool(name: str, source: str) -> str:
    """The path of the program ``name`` (on PATH or beside this Python, where the dev extra
    installs its tools); ``source`` says where it comes from."""
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    path = shutil.which(name, path=search)
    if path is None:
        why = f"needs {name} ({source})"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{why}: CI must have it", pytrace=False)
        pytest.skip(why)
    return path
