import pytest


@pytest.fixture(scope="module", autouse=True)
def lrp_plugin():
    """camrt_lrp on the process-wide plugin manager for this module's tests (the project's suite disables
    entry-point autoloading, and an installed copy may already be there)."""
    import camrt_lrp
    from camrt.plugins import ensure_registered, get_plugin_manager

    pm = get_plugin_manager()
    registered_here = not pm.is_registered(camrt_lrp)
    ensure_registered(pm, "camrt_lrp")
    yield
    if registered_here:
        pm.unregister(camrt_lrp)
