"""The camrt demo: export EfficientNet-Lite0 (real ImageNet weights), then explain real photographs.

Build side (torch): `camrt export` writes one ONNX file with the gradient subgraph.
Deployment side (onnxruntime only): `camrt explain` turns it into Grad-CAM overlays.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

PHOTOS = ("chelsea", "coffee", "astronaut")


def run(args: list[str]) -> subprocess.CompletedProcess:
    print("$", " ".join(args), file=sys.stderr)
    return subprocess.run(args, check=False, text=True, stdout=subprocess.PIPE)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="demo-out", help="output folder")
    parser.add_argument("--method", default="gradcam")
    args = parser.parse_args()
    out = Path(args.out)
    model = out / "efficientnet_lite0.camrt.onnx"
    camrt = [sys.executable, "-m", "camrt"]
    if not model.exists():
        result = run([*camrt, "export", "camrt_exporters.zoo:efficientnet_lite0", "--scale", "1", "--mean", "127",
                      "--std", "128", "--labels", "imagenet", "-o", str(model)])
        if result.returncode:
            return result.returncode
    import cv2
    import skimage.data

    photos = out / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    for name in PHOTOS:
        cv2.imwrite(str(photos / f"{name}.png"), cv2.cvtColor(getattr(skimage.data, name)(), cv2.COLOR_RGB2BGR))
    result = run([*camrt, "explain", str(model), str(photos), "-m", args.method, "-o", str(out / "explanations")])
    for line in result.stdout.splitlines():
        record = json.loads(line)
        if record["status"] == "ok":
            print(f"{Path(record['input']).name:15s} top-1: {record['label']} (class {record['target']}, "
                  f"logit {record['score']:.2f})  overlay: {record['overlay']}")
        else:
            print(f"{record['input']}: error: {record['error']}")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
