"""The import path of the pytest plugin before it moved to profiler.interop.pytest_plugin.

An alias, not a copy: both names are one module, so the plugin registers once.
"""

import sys

from profiler.interop import pytest_plugin as _plugin

sys.modules[__name__] = _plugin
