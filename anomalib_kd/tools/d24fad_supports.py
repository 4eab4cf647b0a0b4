"""D24FAD with supports that change after deployment: export once, swap a small support-feature file.

Three commands:

``export``
    From a D24FAD checkpoint, an OpenVINO IR (or ONNX) whose inputs are the images and the K supports'
    student features, plus ``supports.npz`` (the checkpoint's own supports) next to it.
``features``
    The support-feature file of a folder of normal images (the new supports), computed with the
    checkpoint's weights at its input size. This file is what is swapped: no re-export.
``predict``
    Run the swappable export with a support-feature file on image files; prints one line a image
    (``pred_score``, ``pred_label``) or JSON with ``--json``.

Example:
    python -m anomalib_kd.tools.d24fad_supports export --ckpt_path results/D24FAD/.../model.ckpt \\
        --export_root exports/d24fad
    python -m anomalib_kd.tools.d24fad_supports features --ckpt_path results/D24FAD/.../model.ckpt \\
        --support_dir scanner_b/normals --output exports/d24fad/scanner_b.npz
    python -m anomalib_kd.tools.d24fad_supports predict \\
        --model exports/d24fad/weights/openvino/model.xml --supports exports/d24fad/scanner_b.npz \\
        image1.png image2.png
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _load_module(ckpt_path: str) -> object:
    from anomalib_kd.models.d24fad import D24FAD

    module = D24FAD.load_from_checkpoint(ckpt_path, map_location="cpu")
    return module.eval()


def export_command(args: argparse.Namespace) -> Path:
    module = _load_module(args.ckpt_path)
    if args.support_dir:
        module.set_supports(args.support_dir)
    input_size = tuple(args.input_size) if args.input_size else None
    path = module.export_swappable(args.export_root, args.export_type, input_size)
    print(f"exported {path} (inputs: input, support_0..2); supports file {path.parent / 'supports.npz'}")
    return path


def features_command(args: argparse.Namespace) -> Path:
    from anomalib_kd.data.image import image_files
    from anomalib_kd.models.d24fad.export import save_support_features

    module = _load_module(args.ckpt_path)
    files = image_files(args.support_dir)
    module.set_supports(files)
    path = save_support_features(module, args.output, files)
    print(f"wrote {path}: {len(files)} supports from {args.support_dir}")
    return path


def predict_command(args: argparse.Namespace) -> dict[str, list]:
    from anomalib_kd.models.d24fad.export import run_swappable
    from anomalib_kd.models.d24fad.lightning_model import load_support_image

    images = [load_support_image(path).numpy() for path in args.images]
    shapes = {image.shape for image in images}
    if len(shapes) != 1:
        msg = f"predict takes images of one size per call, got {sorted(shapes)}."
        raise SystemExit(msg)
    outputs = run_swappable(args.model, args.supports, np.stack(images), args.device)
    scores = outputs["pred_score"].reshape(-1).tolist()
    labels = outputs["pred_label"].reshape(-1).tolist() if "pred_label" in outputs else [None] * len(scores)
    result = {"image": [str(p) for p in args.images], "pred_score": scores, "pred_label": labels}
    if args.json:
        print(json.dumps(result))
    else:
        for path, score, label in zip(result["image"], scores, labels, strict=True):
            print(f"{path}\tpred_score={score:.6f}\tpred_label={label}")
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m anomalib_kd.tools.d24fad_supports", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    export = commands.add_parser("export", help="export with support features as graph inputs")
    export.add_argument("--ckpt_path", required=True)
    export.add_argument("--export_root", required=True)
    export.add_argument("--export_type", choices=["openvino", "onnx"], default="openvino")
    export.add_argument("--input_size", type=int, nargs=2, metavar=("H", "W"), help="static input size")
    export.add_argument("--support_dir", help="supports for the bundled supports.npz (default: the ckpt's)")
    export.set_defaults(run=export_command)

    features = commands.add_parser("features", help="support-feature file of a folder of normal images")
    features.add_argument("--ckpt_path", required=True)
    features.add_argument("--support_dir", required=True)
    features.add_argument("--output", required=True)
    features.set_defaults(run=features_command)

    predict = commands.add_parser("predict", help="run a swappable export with a support-feature file")
    predict.add_argument("--model", required=True, help="model.xml or model.onnx of the swappable export")
    predict.add_argument("--supports", required=True, help="support-feature file (.npz)")
    predict.add_argument("--device", default="CPU")
    predict.add_argument("--json", action="store_true")
    predict.add_argument("images", nargs="+")
    predict.set_defaults(run=predict_command)
    return parser


def main(argv: Sequence[str] | None = None) -> object:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
