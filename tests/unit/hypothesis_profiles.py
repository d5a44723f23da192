"""Hypothesis profiles for the property tests: import this module before using ``given``.

``ci`` (the default) runs ~200 examples per property; ``HYPOTHESIS_PROFILE=thorough`` runs
thousands for a local or nightly soak. No example database is written into the repository;
a failure prints the blob to reproduce it with ``@reproduce_failure``.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_COMMON = {
    "deadline": None,  # shared CI machines are noisy; a slow example is not a failure
    "database": None,
    "print_blob": True,
    "suppress_health_check": [HealthCheck.too_slow],
}
settings.register_profile("ci", max_examples=200, **_COMMON)
settings.register_profile("thorough", max_examples=5000, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
