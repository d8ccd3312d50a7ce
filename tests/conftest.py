import os
import sys
import textwrap

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


def write_plugin_modules(folder, modules: dict[str, str], monkeypatch) -> None:
    """Write `modules` (name -> source) into `folder`, put it first on sys.path, forget earlier
    imports of those names, and give camrt.plugins a fresh failure record for the test."""
    from camrt import plugins

    folder.mkdir()
    for module, source in modules.items():
        (folder / f"{module}.py").write_text(textwrap.dedent(source))
        monkeypatch.delitem(sys.modules, module, raising=False)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setattr(plugins, "load_failures", {})  # the module global, not the process's record
