"""`import camrt` stays cheap and the runtime never pulls in torch or the exporters."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import random_image, write_image

HEAVY = ("torch", "camrt_exporters", "onnxruntime", "cv2", "onnx")


def _modules_after(code: str) -> list[str]:
    probe = f"import sys, json\n{code}\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    output = subprocess.run([sys.executable, "-W", "error", "-c", probe], capture_output=True, text=True, check=True)
    return json.loads(output.stdout.strip().splitlines()[-1])


def test_import_camrt_is_light():
    assert _modules_after("import camrt") == []


def test_cli_and_runtime_modules_never_import_torch():
    loaded = _modules_after(
        "import camrt, camrt.cli, camrt.execution.session, camrt.explainer, camrt.imaging.decode, camrt.postprocess, "
        "camrt.plugins.registry, camrt.imaging.render, camrt.methods.gradcam"
    )
    assert "torch" not in loaded and "camrt_exporters" not in loaded and "onnxruntime" not in loaded


@pytest.mark.exporters
def test_building_the_cli_with_plugins_autoloaded_stays_light():
    """What bench/import_time.py times: the CLI built and its commands listed (camrt-exporters'
    `export` included, as installed): the exporters' plugin module is imported, but none of the
    heavy modules (torch, onnxruntime, OpenCV, onnx)."""
    code = ("import os; os.environ['CAMRT_DISABLE_PLUGIN_AUTOLOAD'] = '0'\n"
            "import camrt.cli\nnames = camrt.cli.build_cli().list_commands(None)\n"
            "assert 'export' in names and 'explain' in names, names")
    assert _modules_after(code) == ["camrt_exporters"]


@pytest.mark.exporters
def test_import_camrt_exporters_is_light_and_its_public_names_never_import_torch():
    """The exporter package and its plugin module (imported by every CLI start) load their public
    names lazily; all of them resolve, and none imports torch until an export runs."""
    assert _modules_after("import camrt_exporters, camrt_exporters.plugin, camrt_exporters.hookspecs") == [
        "camrt_exporters"]
    every_name = "import camrt_exporters as e\nfor name in e.__all__: getattr(e, name)"
    assert _modules_after(every_name) == ["camrt_exporters", "onnx"]


def test_explain_run_with_plugins_autoloaded_never_imports_torch(tiny, tmp_path, rng):
    """A real `camrt explain` process, entry-point plugins (camrt-exporters) loaded as in production."""
    image = write_image(str(tmp_path / "x.png"), random_image(rng, 20, 20))
    code = (
        "import atexit, sys, json\n"
        f"atexit.register(lambda: print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]), file=sys.stderr))\n"
        "from camrt.cli import main\n"
        f"main(['explain', {tiny.path!r}, {image!r}, '-o', {str(tmp_path / 'out')!r}])\n"
    )
    env = {**os.environ, "CAMRT_DISABLE_PLUGIN_AUTOLOAD": "0"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["status"] == "ok"
    loaded = json.loads(done.stderr.strip().splitlines()[-1])
    assert "torch" not in loaded
