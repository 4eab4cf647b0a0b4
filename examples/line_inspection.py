"""Run an exported anomalib OpenVINO model over a folder of images or a video, as an inspection station would.

    python examples/line_inspection.py exported/weights/openvino/model.xml path/to/images --out results/line
    python examples/line_inspection.py model.xml line_camera.mp4 --out results/line --overlays

- OpenVINO ``AsyncInferQueue`` with ``PERFORMANCE_HINT=THROUGHPUT`` (as many requests in flight as the
  device wants, all cores busy); ``--precision f32`` (default, the scores the tests check) or ``bf16``
  (OpenVINO's CPU default where supported: faster, scores move by up to ~0.1).
- Pre-processing is what the exported graph expects: RGB float32 in [0, 1], NCHW, at the IR's input
  size (images of another size are resized first, area interpolation); the graph itself holds the
  model's resize, normalisation and anomalib's post-processing.
- ``<out>/verdicts.csv``: one row per image/frame (source, score, label, mask path, error); masks as
  PNG under ``<out>/masks``; ``--overlays`` adds ``<out>/overlays`` (image | anomaly map heat overlay).
- An unreadable image or frame is logged, written to the CSV with its error, counted in the summary,
  and the run goes on.
- D24FAD with swappable supports (``python -m anomalib_kd.tools.d24fad_supports export``): ``--supports
  line_b.npz`` feeds that support-feature file's arrays as the IR's ``support_*`` inputs of every request,
  so swapping the reference images of a line is swapping the file.
- An IR exported with the fused selective scan (``export_openvino(..., fused=True)``, PDD and DHKD) is read
  with its OpenVINO extension (``anomalib_kd.components.ssm.fused.read_model``).
"""

from __future__ import annotations

import argparse
import csv
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import openvino as ov
from tqdm.auto import tqdm

from anomalib_kd.components.ssm.fused import read_model

logger = logging.getLogger("line_inspection")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
CSV_FIELDS = ["index", "source", "score", "label", "mask_path", "error"]


@dataclass
class Frame:
    """One item to inspect: its index, where it came from, and the RGB image (``None`` if unreadable)."""

    index: int
    source: str
    image: np.ndarray | None
    error: str = ""


@dataclass
class Summary:
    """Counts of a run, printed at the end."""

    inspected: int = 0
    anomalous: int = 0
    unreadable: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def __str__(self) -> str:
        rate = self.inspected / self.seconds if self.seconds else 0.0
        text = (
            f"inspected {self.inspected} ({self.anomalous} anomalous), unreadable {len(self.unreadable)}, "
            f"{self.seconds:.1f} s, {rate:.1f} images/s"
        )
        return text + (f"; unreadable: {', '.join(self.unreadable[:10])}" if self.unreadable else "")


def iter_frames(source: Path) -> Iterator[Frame]:
    """RGB uint8 frames of a folder (sorted, recursive) or a video file; unreadable ones carry an error."""
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        for index, path in enumerate(files):
            bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if bgr is None:
                yield Frame(index, str(path), None, "unreadable image (corrupt or unsupported file)")
            else:
                yield Frame(index, str(path), cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
        return
    if not source.is_file():
        msg = f"Input {source} is neither a folder of images nor a video file."
        raise FileNotFoundError(msg)
    capture = cv2.VideoCapture(str(source))
    if not capture.isOpened():
        msg = f"OpenCV cannot open {source} as a video."
        raise ValueError(msg)
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    index = 0
    try:
        while True:
            ok, bgr = capture.read()
            if not ok:
                if total > 0 and index < total:  # a broken frame before the announced end: skip it
                    yield Frame(index, f"{source}#{index}", None, "unreadable video frame")
                    index += 1
                    if capture.get(cv2.CAP_PROP_POS_FRAMES) >= total:
                        break
                    continue
                break
            yield Frame(index, f"{source}#{index}", cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
            index += 1
    finally:
        capture.release()


def input_size(model: ov.Model) -> tuple[int, int] | None:
    """Static (H, W) of the IR's image input, ``None`` when dynamic."""
    shape = model.input(0).partial_shape
    if shape.rank.is_static and len(shape) == 4 and shape[2].is_static and shape[3].is_static:
        return shape[2].get_length(), shape[3].get_length()
    return None


def support_inputs(model: ov.Model, supports: Path | None, xml: Path) -> dict[str, np.ndarray]:
    """The ``support_*`` inputs of a swappable D24FAD IR, read from ``supports`` (empty otherwise)."""
    names = [port.get_any_name() for port in model.inputs[1:]]
    if supports is None:
        if names:
            msg = f"{xml} also takes {names}: pass the support-feature file with --supports."
            raise ValueError(msg)
        return {}
    if not names:
        msg = f"{xml} has a single input (supports baked in): --supports does not apply."
        raise ValueError(msg)
    from anomalib_kd.models.d24fad.export import load_support_features

    features = load_support_features(supports)
    missing = sorted(set(names) - set(features))
    if missing:
        msg = f"{supports} lacks the IR's inputs {missing}."
        raise ValueError(msg)
    return {name: features[name] for name in names}


def to_input(image: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """RGB uint8 HWC -> float32 [0, 1] NCHW at ``size`` (the exported graph's own input format)."""
    if size is not None and image.shape[:2] != size:
        height, width = size
        shrinking = height * width < image.shape[0] * image.shape[1]
        image = cv2.resize(
            image, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
        )
    return np.ascontiguousarray(image.astype(np.float32).transpose(2, 0, 1)[None] / 255.0)


def overlay(image: np.ndarray, anomaly_map: np.ndarray) -> np.ndarray:
    """Image beside the image blended with a JET heat map of the (0..1) anomaly map, BGR for cv2.imwrite."""
    heat = np.clip(anomaly_map, 0.0, 1.0)
    heat = cv2.resize(
        heat.astype(np.float32), (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR
    )
    colored = cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET)
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    return np.hstack([bgr, cv2.addWeighted(bgr, 0.5, colored, 0.5, 0)])


def run(
    xml: Path,
    source: Path,
    out: Path,
    device: str = "CPU",
    precision: str = "f32",
    overlays: bool = False,
    jobs: int = 0,
    supports: Path | None = None,
) -> Summary:
    """Inspect every frame of ``source`` with the IR ``xml``; verdicts, masks and overlays go to ``out``.

    ``supports``: a D24FAD support-feature file for an IR exported with swappable supports.
    """
    core = ov.Core()
    model = read_model(xml, core)  # a fused-scan IR gets its extension (built on first use)
    extra_inputs = support_inputs(model, supports, xml)
    size = input_size(model)
    config: dict[str, str] = {"PERFORMANCE_HINT": "THROUGHPUT"}
    if precision != "default":
        config["INFERENCE_PRECISION_HINT"] = precision
    compiled = core.compile_model(model, device, config)
    outputs = {port.get_any_name(): index for index, port in enumerate(compiled.outputs)}
    if "pred_score" not in outputs:
        msg = f"{xml} has no 'pred_score' output (outputs: {sorted(outputs)}): not an anomalib export."
        raise ValueError(msg)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    if overlays:
        (out / "overlays").mkdir(parents=True, exist_ok=True)
    rows: dict[int, dict[str, object]] = {}
    summary = Summary()

    def on_done(request: ov.InferRequest, frame: Frame) -> None:
        result = {name: request.get_output_tensor(i).data.copy() for name, i in outputs.items()}
        score = float(result["pred_score"].reshape(-1)[0])
        label = bool(result["pred_label"].reshape(-1)[0]) if "pred_label" in result else score > 0.5
        stem = f"{frame.index:06d}_{Path(frame.source.split('#')[0]).stem}"
        mask_path = ""
        if "pred_mask" in result:
            mask_path = str(out / "masks" / f"{stem}.png")
            cv2.imwrite(
                mask_path, result["pred_mask"].reshape(result["pred_mask"].shape[-2:]).astype(np.uint8) * 255
            )
        if overlays and "anomaly_map" in result and frame.image is not None:
            anomaly_map = result["anomaly_map"].reshape(result["anomaly_map"].shape[-2:])
            cv2.imwrite(str(out / "overlays" / f"{stem}.png"), overlay(frame.image, anomaly_map))
        rows[frame.index] = {"score": f"{score:.6f}", "label": int(label), "mask_path": mask_path}
        summary.inspected += 1
        summary.anomalous += int(label)

    queue = ov.AsyncInferQueue(compiled, jobs)
    queue.set_callback(on_done)
    frames: list[Frame] = []
    start = time.perf_counter()
    with tqdm(iter_frames(source), desc="inspecting", unit="img", dynamic_ncols=True) as progress:
        for frame in progress:
            frames.append(Frame(frame.index, frame.source, None, frame.error))
            if frame.image is None:
                logger.error("Skipped %s: %s", frame.source, frame.error)
                summary.unreadable.append(frame.source)
                continue
            queue.start_async({0: to_input(frame.image, size), **extra_inputs}, frame)
        queue.wait_all()
    summary.seconds = time.perf_counter() - start

    with (out / "verdicts.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for frame in frames:
            row = rows.get(frame.index, {"score": "", "label": "", "mask_path": ""})
            writer.writerow({"index": frame.index, "source": frame.source, **row, "error": frame.error})
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("xml", type=Path, help="exported IR (.../weights/openvino/model.xml)")
    parser.add_argument("source", type=Path, help="folder of images (recursive) or a video file")
    parser.add_argument("--out", type=Path, default=Path("line_inspection"), help="output folder")
    parser.add_argument("--device", default="CPU")
    parser.add_argument("--precision", choices=["f32", "bf16", "f16", "default"], default="f32")
    parser.add_argument("--overlays", action="store_true", help="write image | heat-map overlays")
    parser.add_argument("--jobs", type=int, default=0, help="requests in flight (0: the device's optimum)")
    parser.add_argument("--supports", type=Path, default=None, help="D24FAD support-feature file (.npz)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    summary = run(
        args.xml, args.source, args.out, args.device, args.precision, args.overlays, args.jobs, args.supports
    )
    print(summary)
    print(f"verdicts: {args.out / 'verdicts.csv'}")


if __name__ == "__main__":
    main()
