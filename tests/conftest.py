"""Shared test fixtures."""
import os
import sys

from tests.audio_fixtures import *  # noqa: F401,F403
from tests.vlm_fixtures import *  # noqa: F401,F403
from tests.browser import chromium  # noqa: F401
from tests.tracing_fixtures import *  # noqa: F401,F403


def pytest_configure(config):
    """One CPU thread per process: the in-process servers here and the service processes tests start share
    a small machine, where more threads than cores made every model step several times slower (issue 15).
    Service processes also get --torch-threads 1 (tests/real_stack.py) or embedded mode's share."""
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(variable, "1")
    if "torch" in sys.modules:  # imported before this hook: the variable came too late for it
        sys.modules["torch"].set_num_threads(1)
