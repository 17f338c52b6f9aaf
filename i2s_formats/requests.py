"""Deprecated name of `i2s_formats.contract` (0.3): it shadowed the well-known HTTP library's name.
Kept for one release; import `i2s_formats.contract` instead."""
import warnings

warnings.warn("i2s_formats.requests is renamed i2s_formats.contract; the old name goes in 0.5",
              DeprecationWarning, stacklevel=2)

from i2s_formats.contract import *  # noqa: E402,F401,F403
from i2s_formats.contract import clean_request_id, with_defaults  # noqa: E402,F401
