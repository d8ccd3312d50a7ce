"""camrt on a real local Ray cluster (`ray.init(num_cpus=2)`): the records and heatmaps equal the
local CLI's, a corrupt image is an error row, a killed actor loses and duplicates nothing, and a
rerun with --skip-existing redoes only what is missing."""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray Data is part of the test install (pip install '.[test]')")

from camrt.cli import build_cli  # noqa: E402
from camrt.ray import ExplainBatches, explain_with_ray, input_rows  # noqa: E402

IMAGES = 50
#: Fields that differ between two runs by construction: timing, and paths under different OUTDIRs.
RUN_SPECIFIC = ("elapsed_ms", "heatmap", "overlay", "outputs")
ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster():
    # Workers import camrt (and, for the killed-actor test, this package) like the driver does.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
        yield
        ray.shutdown()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> pathlib.Path:
    import cv2

    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(7)
    for i in range(IMAGES):
        size = (24 + i % 5 * 4, 30 + i % 3 * 6)
        cv2.imwrite(str(folder / f"img_{i:03d}.png"), rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    (folder / "img_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return folder


def local_cli(model: str, photos: pathlib.Path, outdir: pathlib.Path) -> list[dict]:
    from click.testing import CliRunner

    result = CliRunner().invoke(build_cli(), ["explain", model, str(photos), "-o", str(outdir), "--quiet",
                                              "--format", "png,npy,jsonl"])
    assert result.exit_code == 1, result.output  # the broken image
    return [json.loads(line) for line in (outdir / "camrt-records.jsonl").read_text().splitlines()]


def manifest(outdir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (outdir / "camrt-records.jsonl").read_text().splitlines()]


def comparable(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in RUN_SPECIFIC}


def test_ray_records_and_heatmaps_equal_the_local_cli(tiny, photos, tmp_path, cluster):
    want = local_cli(tiny.path, photos, tmp_path / "local")
    counts = explain_with_ray(tiny.path, [str(photos)], str(tmp_path / "ray"), actors=2, batch_size=8)
    got = manifest(tmp_path / "ray")
    assert counts == {"inputs": IMAGES + 1, "skipped": 0, "records": IMAGES + 1, "failed": 1}
    by_input = {r["input"]: r for r in got}
    assert len(by_input) == len(got) == len(want)
    for record in want:
        mine = by_input[record["input"]]
        assert comparable(mine) == comparable(record)
        if record["status"] == "ok":
            local = np.load(record["heatmap"])
            remote = np.load(mine["heatmap"])
            np.testing.assert_allclose(remote, local, rtol=0, atol=1e-6)
            assert os.path.basename(mine["overlay"]) == os.path.basename(record["overlay"])
    broken = by_input[str(photos / "img_broken.png")]
    assert broken["status"] == "error" and "img_broken.png" in broken["error"]


def test_the_map_batches_rows_carry_heatmaps_and_overlay_bytes(tiny, photos, tmp_path, cluster):
    import cv2

    rows = input_rows([str(photos / "img_001.png"), str(photos / "img_broken.png")])
    dataset = ray.data.from_items(rows).map_batches(
        ExplainBatches, fn_constructor_kwargs={"model": tiny.path, "formats": "", "overlay_bytes": True,
                                               "outdir": str(tmp_path)},
        batch_size=2, batch_format="numpy", concurrency=1)
    out = {str(row["input"]): row for row in dataset.take_all()}
    ok, bad = out[rows[0]["input"]], out[rows[1]["input"]]
    record = json.loads(ok["record"])
    assert record["status"] == "ok" and bad["status"] == "error" and bad["heatmap_array"].size == 0
    from camrt import Explainer, load_image

    image = load_image(rows[0]["input"])
    want = Explainer(tiny.path).explain([image])[0]
    np.testing.assert_allclose(ok["heatmap_array"], want.heatmap, rtol=0, atol=1e-6)
    decoded = cv2.imdecode(np.frombuffer(ok["overlay_png"], np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape[:2] == image.shape[:2] and record["target"] == want.target


class DiesOnce(ExplainBatches):
    """Kills its own worker process the first time it meets img_017.png (a marker file remembers)."""

    MARKER_ENV = "CAMRT_TEST_DIES_ONCE_MARKER"

    def __call__(self, batch):
        marker = os.environ[self.MARKER_ENV]
        if any(str(p).endswith("img_017.png") for p in batch["input"]) and not os.path.exists(marker):
            pathlib.Path(marker).touch()
            os._exit(1)
        return super().__call__(batch)


def test_a_killed_actor_loses_and_duplicates_nothing(tiny, photos, tmp_path, cluster, monkeypatch):
    marker = tmp_path / "died"
    monkeypatch.setenv(DiesOnce.MARKER_ENV, str(marker))
    # the actors inherit the environment of the cluster's raylet: start one that has the marker's name
    ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    counts = explain_with_ray(tiny.path, [str(photos)], str(tmp_path / "out"), actors=2, batch_size=4,
                              batches=DiesOnce)
    assert marker.exists(), "the actor was never killed: the test proves nothing"
    inputs = [r["input"] for r in manifest(tmp_path / "out")]
    assert sorted(inputs) == sorted(str(p) for p in photos.iterdir())
    assert counts["records"] == IMAGES + 1 and counts["failed"] == 1


def test_a_rerun_with_skip_existing_redoes_only_what_is_missing(tiny, photos, tmp_path, cluster):
    outdir = tmp_path / "out"
    explain_with_ray(tiny.path, [str(photos)], str(outdir), batch_size=16)
    before = manifest(outdir)
    # a killed run: two inputs lost their overlay, one lost its record (the log's last line)
    os.remove(outdir / "img_003.overlay.png")
    os.remove(outdir / "img_040.heatmap.npy")
    lines = (outdir / "camrt-records.jsonl").read_text().splitlines()
    dropped = json.loads(lines[-1])["input"]
    (outdir / "camrt-records.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    counts = explain_with_ray(tiny.path, [str(photos)], str(outdir), batch_size=16, skip_existing=True)
    redone = {r["input"] for r in manifest(outdir)[len(lines) - 1:]}
    expected = {str(photos / "img_003.png"), str(photos / "img_040.png"), dropped, str(photos / "img_broken.png")}
    assert redone == expected
    assert counts["skipped"] == IMAGES + 1 - len(expected)
    after = {r["input"]: comparable(r) for r in manifest(outdir)}
    assert after == {r["input"]: comparable(r) for r in before}


def test_parquet_manifest_resumes_too(tiny, photos, tmp_path, cluster):
    import pyarrow.parquet as pq

    outdir = tmp_path / "out"
    explain_with_ray(tiny.path, [str(photos)], str(outdir), manifest="parquet", batch_size=16)
    table = pq.read_table(outdir / "camrt-records.parquet")
    assert table.num_rows == IMAGES + 1
    counts = explain_with_ray(tiny.path, [str(photos)], str(outdir), manifest="parquet", batch_size=16,
                              skip_existing=True)
    assert counts["skipped"] == IMAGES and counts["records"] == 1  # only the broken image is retried


def test_the_ray_explain_examples_run(tiny, photos, tmp_path, cluster, monkeypatch):
    import shlex
    import shutil

    from click.testing import CliRunner

    from .cli_docs import DOCS, examples

    shutil.copy(tiny.path, tmp_path / "model.camrt.onnx")
    shutil.copytree(photos, tmp_path / "photos")
    (tmp_path / "photos" / "img_broken.png").unlink()
    monkeypatch.chdir(tmp_path)
    lines = examples((DOCS / "ray-explain.txt").read_text())
    assert len(lines) == 3
    for line in lines:
        result = CliRunner().invoke(build_cli(), shlex.split(line)[1:], catch_exceptions=False)
        assert result.exit_code == 0, f"{line}\n{result.output}"
    records = manifest(tmp_path / "out")
    assert {r["input"] for r in records} == {os.path.join("photos", p.name) for p in (tmp_path / "photos").iterdir()}
    assert all(r["status"] == "ok" for r in records)


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory, exporter) -> str:
    """A small segmenter (conv-relu `feat` -> 1x1 conv: logits [B, 3, 32, 32]) exported with a seed."""
    import torch

    from camrt import contract
    from camrt_exporters.export import export_torch, write_model

    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("feat", torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.ReLU()))
    model.add_module("head", torch.nn.Conv2d(6, 3, 1))
    onnx_model, _ = export_torch(model.eval(), layers=["feat"], input_size=(32, 32), rules=[contract.RULE_VANILLA],
                                 seed=True)
    path = tmp_path_factory.mktemp("segmenter") / "seg.camrt.onnx"
    write_model(onnx_model, path)
    return str(path)


def _local_and_ray(model: str, images: list[str], options: list[str], tmp_path) -> tuple[list[dict], list[dict]]:
    """The records of `camrt explain` (stdout) and of `camrt ray-explain` (its manifest) with the same options."""
    from click.testing import CliRunner

    local = CliRunner().invoke(build_cli(), ["explain", model, *images, *options, "-o", str(tmp_path / "local"), "-q"],
                               catch_exceptions=False)
    assert local.exit_code == 0, local.output
    remote = CliRunner().invoke(build_cli(), ["ray-explain", model, *images, *options, "-o", str(tmp_path / "ray"),
                                              "-q"], catch_exceptions=False)
    assert remote.exit_code == 0, remote.output
    return [json.loads(line) for line in local.stdout.splitlines()], manifest(tmp_path / "ray")


def test_ray_explain_takes_a_region_per_target(segmenter, tmp_path, cluster):
    """`camrt ray-explain ... --target seg:1 --target seg:2 --region a.png --region b.png` writes the
    records (each naming its own region) and heatmaps the local `camrt explain` does with the same options
    (tests/exporters/test_seeded_targets.py checks those against pytorch-grad-cam)."""
    import cv2

    rng = np.random.default_rng(4)
    images = [str(tmp_path / f"img{i}.png") for i in range(3)]
    for path in images:
        cv2.imwrite(path, rng.integers(0, 256, (40, 36, 3), dtype=np.uint8))
    masks = {1: str(tmp_path / "a.png"), 2: str(tmp_path / "b.png")}
    for category, rows in ((1, slice(4, 20)), (2, slice(16, 30))):
        mask = np.zeros((32, 32, 3), np.uint8)
        mask[rows, 10:30] = 255
        cv2.imwrite(masks[category], mask)
    options = ["--target", "seg:1", "--target", "seg:2", "--region", masks[1], "--region", masks[2], "--format", "npy"]
    want, records = _local_and_ray(segmenter, images, options, tmp_path)
    got = {(r["input"], r["rank"]): r for r in records}
    assert len(got) == len(want) == 6
    for record in want:
        mine = got[(record["input"], record["rank"])]
        assert comparable(mine) == comparable(record)
        assert mine["target_params"] == {"class": record["target"], "region": masks[record["target"]]}
        np.testing.assert_allclose(np.load(mine["heatmap"]), np.load(record["heatmap"]), rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def detector(tmp_path_factory, exporter) -> str:
    """A tiny detector whose raw head is candidates-first xyxy: [B, 64, 4 + 2] (an 8 x 8 grid of cells
    on a 32 x 32 input, each a box around its cell and two sigmoid class scores), exported with a seed."""
    import torch

    from camrt import contract
    from camrt_exporters.export import export_torch, write_model

    class Detector(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.feat = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.AvgPool2d(4))
            self.head = torch.nn.Conv2d(6, 6, 1)
            centres = torch.arange(8, dtype=torch.float32) * 4 + 2
            self.register_buffer("cy", centres.view(1, 8, 1).expand(1, 8, 8).reshape(1, 64))
            self.register_buffer("cx", centres.view(1, 1, 8).expand(1, 8, 8).reshape(1, 64))

        def forward(self, x):
            out = self.head(self.feat(x)).flatten(2)  # [B, 6, 64]
            cx, cy = self.cx + 4 * torch.tanh(out[:, 0]), self.cy + 4 * torch.tanh(out[:, 1])
            w, h = 4 + 8 * torch.sigmoid(out[:, 2]), 4 + 8 * torch.sigmoid(out[:, 3])
            boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=2)
            return torch.cat([boxes, torch.sigmoid(out[:, 4:]).transpose(1, 2)], dim=2)  # [B, 64, 6]

    torch.manual_seed(0)
    onnx_model, _ = export_torch(Detector().eval(), layers=["feat.1"], input_size=(32, 32),
                                 rules=[contract.RULE_VANILLA], seed=True)
    path = tmp_path_factory.mktemp("detector") / "det.camrt.onnx"
    write_model(onnx_model, path)
    return str(path)


def test_ray_explain_takes_the_box_options(detector, tmp_path, cluster):
    """`camrt ray-explain ... --target box:... --box-iou --box-format --box-layout` writes the records
    and heatmaps the local `camrt explain` does with the same options (which tests/exporters/
    test_detectors.py checks against torch autograd)."""
    import cv2

    rng = np.random.default_rng(5)
    images = [str(tmp_path / f"img{i}.png") for i in range(2)]
    for path in images:
        cv2.imwrite(path, rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    options = ["--target", "box:6,6,18,18:1", "--box-iou", "0.2", "--box-format", "xyxy", "--box-layout",
               "candidates-first", "--format", "npy"]
    want, records = _local_and_ray(detector, images, options, tmp_path)
    got = {r["input"]: r for r in records}
    assert len(got) == len(want) == 2
    for record in want:
        mine = got[record["input"]]
        assert record["status"] == "ok" and comparable(mine) == comparable(record)
        assert mine["target_params"] == {"box": [6.0, 6.0, 18.0, 18.0], "label": 1, "iou_threshold": 0.2,
                                         "box_format": "xyxy", "layout": "candidates-first"}
        np.testing.assert_allclose(np.load(mine["heatmap"]), np.load(record["heatmap"]), rtol=0, atol=1e-6)


def test_ray_explain_checks_method_and_target_before_starting(tiny, segmenter, photos, tmp_path, monkeypatch):
    """A target the file cannot serve, a method that cannot explain it, or --region on a class
    target: the error of `camrt explain`, before any Ray actor starts."""
    from click.testing import CliRunner

    import camrt.ray

    def started(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(camrt.ray, "explain_with_ray", started)

    def ray_explain(*args):
        return CliRunner().invoke(build_cli(), ["ray-explain", *args, "-o", str(tmp_path / "out")])

    no_seed = ray_explain(tiny.path, str(photos), "--target", "seg:0")
    assert no_seed.exit_code == 3 and "camrt export ... --seed" in no_seed.output
    refused = ray_explain(segmenter, str(photos), "--target", "seg:0", "-m", "eigencam")
    assert refused.exit_code == 2 and "method 'eigencam' cannot explain a seg target" in refused.output
    region = ray_explain(tiny.path, str(photos), "--target", "3", "--region", str(tmp_path / "mask.png"))
    assert region.exit_code == 2 and "--region applies to --target seg:..., not to '3'" in region.output
    regions = ray_explain(segmenter, str(photos), "--target", "seg:0", "--target", "seg:1", "--region",
                          str(tmp_path / "mask.png"), "--region", str(tmp_path / "mask.png"), "--region", str(photos))
    assert regions.exit_code == 2 and "--region is given 3 times for 2 --target values" in regions.output
    out_of_range = ray_explain(tiny.path, str(photos), "--target", "1,7")
    assert out_of_range.exit_code == 2 and "--target 7 is out of range" in out_of_range.output
    box_iou = ray_explain(tiny.path, str(photos), "--target", "3", "--box-iou", "0.3")
    assert box_iou.exit_code == 2 and "--box-iou applies to --target box:..., not to '3'" in box_iou.output
