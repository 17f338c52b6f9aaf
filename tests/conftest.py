"""Shared test fixtures."""
from tests.audio_fixtures import *  # noqa: F401,F403
from tests.vlm_fixtures import *  # noqa: F401,F403
from tests.browser import chromium  # noqa: F401
