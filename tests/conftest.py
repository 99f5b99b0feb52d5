"""Hypothesis profiles, picked by ``HYPOTHESIS_PROFILE``: ``ci`` (default) or ``deep``."""

import os

from hypothesis import settings

settings.register_profile("ci", max_examples=200, deadline=None)
settings.register_profile("deep", max_examples=10_000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
