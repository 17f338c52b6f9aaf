"""Deprecated: the client moved to the i2s_client package (`from i2s_client import ImageToSoundClient`).

Kept for one release (0.3) so that Phase 2 code written against 0.2 keeps working; it goes in 0.4."""
import warnings

from i2s_client import *  # noqa: F401,F403 (the re-export is the point)
from i2s_client import __all__  # noqa: F401

warnings.warn("orchestrator.client is deprecated: import from i2s_client instead (it goes in 0.4)",
              DeprecationWarning, stacklevel=2)
