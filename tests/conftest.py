import os

# Hermetic: third-party plugins installed in the environment must not change test results.
os.environ.setdefault("CAMRT_DISABLE_PLUGIN_AUTOLOAD", "1")
