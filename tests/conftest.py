import os

import pytest

# Hermetic: third-party plugins installed in the environment must not change test results.
os.environ.setdefault("CAMRT_DISABLE_PLUGIN_AUTOLOAD", "1")


@pytest.fixture
def plugin():
    """Register a plugin object on the process-wide manager for one test only."""
    from camrt.plugins import get_plugin_manager

    pm = get_plugin_manager()
    registered = []

    def register(obj, name: str):
        pm.register(obj, name=name)
        registered.append(obj)
        return obj

    yield register
    for obj in registered:
        pm.unregister(obj)
