"""``cga-jax`` console command: a dispatch table of subcommands.

Add a subcommand by writing ``_add_NAME(subparsers)`` + ``_run_NAME(args) -> int`` and an entry
in :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from cga_jax.checkpoint_io import FORMATS, atomic_write, atomic_write_bytes, read_meta
from cga_jax.classes import imagenet_class_names, read_class_names
from cga_jax.convert import convert
from cga_jax.errors import CheckpointError
from cga_jax.evaluate import evaluate
from cga_jax.factory import create_model, pretrained_source
from cga_jax.loading import load_pretrained
from cga_jax.onnx_export import DEFAULT_OPSET, export_onnx, parse_img_size
from cga_jax.onnx_quantize import list_images, quantize_int8
from cga_jax.predict import predict
from cga_jax.preprocess import list_image_folder
from cga_jax.serving import export_serving
from cga_jax.torch_export import LAYOUTS, export_torch
from cga_jax.training.arrayrecord import main_pack
from cga_jax.xla_options import apply_cpu_flags

WEIGHTS_HELP = (
    "a `cga-jax convert` directory, a checkpoint file (.pth/.safetensors/.npz), 'official' (the "
    "release weights of --model), official:<model>, hf-hub:<org>/<name> or an http(s)/file URL"
)


def _add_convert(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="e.g. efficientvit_m4")
    p.add_argument(
        "--src",
        required=True,
        help="a .pth/.safetensors/.npz file, official:efficientvit_m0, "
        "hf-hub:timm/efficientvit_m0.r224_in1k or an http(s)/file URL (downloads are cached)",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--num-classes", type=int, default=None, help="new classifier size (drops head)")
    p.add_argument("--img-size", type=int, default=None, help="resize attention-bias tables")
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="safetensors",
        help="weights as model.safetensors (default), an Orbax checkpoint (orbax/) or both",
    )


def _run_convert(a: argparse.Namespace) -> int:
    notes = convert(
        a.model, a.src, a.out, num_classes=a.num_classes, img_size=a.img_size, fmt=a.format
    )
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {a.out}")
    return 0


def _add_export_torch(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True)
    p.add_argument("--weights", required=True, help=WEIGHTS_HELP)
    p.add_argument("--out", required=True, help="output .pth (or .safetensors)")
    p.add_argument("--layout", choices=LAYOUTS, default="official")


def _run_export_torch(a: argparse.Namespace) -> int:
    import torch

    model = _load_model(a.model, a.weights)
    meta = read_meta(a.weights) if os.path.isdir(a.weights) else {}
    sd = export_torch(model, a.layout, meta.get("num_batches_tracked", 0))
    if a.out.endswith(".safetensors"):
        from safetensors.torch import save_file

        atomic_write(a.out, lambda path: save_file(sd, path))
    else:
        obj = {"model": sd} if a.layout == "official" else sd
        atomic_write(a.out, lambda path: torch.save(obj, path))
    print(f"wrote {a.out}")
    return 0


def _image_size(text: str) -> tuple[int, int]:
    try:
        return parse_img_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _batch(text: str) -> int | None:
    if text == "dynamic":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer or 'dynamic', got {text!r}")
    return int(text)


def _add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True)
    p.add_argument("--weights", default=None, help="checkpoint (default: random initialisation)")
    p.add_argument(
        "--out", required=True, help="output file: a jax.export artifact or an .onnx graph"
    )
    p.add_argument(
        "--format",
        choices=("jax", "onnx"),
        default="jax",
        help="jax: serialized jax.export (StableHLO) artifact (default); onnx: ONNX graph",
    )
    p.add_argument(
        "--img-size",
        type=_image_size,
        default=None,
        help="S or HxW: the input size, also the size the model is built for (default: the "
        "model's, 224)",
    )
    p.add_argument("--no-fuse", action="store_true", help="keep BatchNorm unfolded")
    p.add_argument(
        "--platforms",
        default=None,
        help="jax: comma-separated platforms of the artifact, e.g. cpu,cuda,tpu (default: this "
        "machine's)",
    )
    p.add_argument("--batch", type=_batch, default=None, help="onnx: N or dynamic (default)")
    p.add_argument("--opset", type=int, default=None, help="onnx: opset (default 17)")
    p.add_argument(
        "--layout", choices=("nhwc", "nchw"), default=None, help="onnx: input layout (nhwc)"
    )
    p.add_argument(
        "--quantize", choices=("int8",), default=None, help="onnx: static int8 (QDQ) quantization"
    )
    p.add_argument("--calib", default=None, help="with --quantize: folder of calibration images")
    p.add_argument(
        "--calib-images", type=int, default=128, help="with --quantize: at most this many (128)"
    )


def _export_option_errors(a: argparse.Namespace) -> list[str]:
    """Options that do not go together (checked before any work)."""
    errors = []
    if a.format == "jax":
        for opt, val in (("--batch", a.batch), ("--opset", a.opset), ("--layout", a.layout),
                         ("--quantize", a.quantize), ("--calib", a.calib)):  # fmt: skip
            if val is not None:
                errors.append(f"{opt} applies to --format onnx only (the jax.export artifact "
                              "has a dynamic batch and NHWC input)")  # fmt: skip
    else:
        if a.platforms is not None:
            errors.append("--platforms applies to --format jax only")
        if a.quantize and not a.calib:
            errors.append("--quantize int8 needs --calib DIR (calibration images)")
        if a.calib and not a.quantize:
            errors.append("--calib is only used with --quantize int8")
    return errors


def _check_output(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a directory; --out must be a file path")
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(
            f"{path}: cannot write there (the directory {parent} is missing or not writable)"
        )


def _run_export(a: argparse.Namespace) -> int:
    errors = _export_option_errors(a)
    if errors:
        for e in errors:
            print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        _check_output(a.out)
        if a.calib:
            list_images(a.calib)  # a missing / empty folder fails before the export
        platforms = None
        if a.platforms is not None:
            platforms = [p.strip() for p in a.platforms.split(",") if p.strip()]
        size = a.img_size[0] if a.img_size and a.img_size[0] == a.img_size[1] else a.img_size
        model = _load_model(a.model, a.weights, img_size=size)
        if a.weights is None:
            print("note: no --weights: exporting randomly initialised weights", file=sys.stderr)
        if a.format == "onnx":
            return _export_onnx(a, model)
        return _export_jax(a, model, platforms)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _export_jax(a: argparse.Namespace, model, platforms: list[str] | None) -> int:
    h, w = model.cfg.img_hw
    data = export_serving(model, (h, w), fuse=not a.no_fuse, platforms=platforms)
    atomic_write_bytes(a.out, data)
    print(f"wrote {a.out} ({len(data)} bytes; input (b, {h}, {w}, 3) NHWC)")
    return 0


def _export_onnx(a: argparse.Namespace, model) -> int:
    layout = (a.layout or "nhwc").upper()
    opset = a.opset or DEFAULT_OPSET
    path = None if a.quantize else a.out
    proto = export_onnx(
        model, path, batch=a.batch, opset=opset, input_layout=layout, fuse=not a.no_fuse
    )
    what = "float32"
    if a.quantize:
        proto = quantize_int8(proto, a.calib, a.out, max_images=a.calib_images)
        meta = {p.key: p.value for p in proto.metadata_props}
        what = f"int8 QDQ, calibrated on {meta['calibration_images']} images"
    h, w = model.cfg.img_hw
    b = a.batch or "batch"
    shape = f"({b}, 3, {h}, {w})" if layout == "NCHW" else f"({b}, {h}, {w}, 3)"
    print(
        f"wrote {a.out} ({os.path.getsize(a.out)} bytes; ONNX opset {opset}, {what}; "
        f"input {shape} {layout} -> {proto.graph.output[0].name})"
    )
    return 0


def _load_model(
    name: str, weights: str | None, img_size: int | None = None, num_classes: int | None = None
):
    """The model ``name`` with ``weights`` (if any) loaded strictly: a classifier of another size
    is an error, not re-initialised. ``num_classes`` / ``img_size`` default to a converted
    directory's config, else the model's. Notes go to stderr."""
    cfg = read_meta(weights).get("config", {}) if weights and os.path.isdir(weights) else {}
    try:
        model = create_model(
            name,
            num_classes=num_classes or cfg.get("num_classes"),
            img_size=img_size or cfg.get("img_size"),
        )
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if weights:
        for note in load_pretrained(model, pretrained_source(name, weights)):
            print(f"note: {note}", file=sys.stderr)
    return model


def _add_eval(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    p.add_argument("--data", required=True, help="image folder: DIR/<class>/<image>")
    p.add_argument("--batch-size", type=int, default=256, help="global batch (all devices)")
    p.add_argument("--workers", type=int, default=None, help="decoding threads (0: inline)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run_eval(a: argparse.Namespace) -> int:
    list_image_folder(a.data)  # a missing / empty folder fails before the model is built
    model = _load_model(a.model, a.weights, a.img_size, a.num_classes)
    r = evaluate(
        model,
        a.data,
        batch_size=a.batch_size,
        img_size=a.img_size,
        crop_pct=a.crop_pct,
        workers=a.workers,
        progress=not a.no_progress,
    )
    for path in r["skipped_files"][:20]:
        print(f"skipped (unreadable): {path}", file=sys.stderr)
    if r["skipped"] > 20:
        print(f"... and {r['skipped'] - 20} more unreadable files", file=sys.stderr)
    print(
        f"images: {r['images']} ({r['classes']} classes; {r['skipped']} unreadable skipped)\n"
        f"top-1: {r['top1']:.3f}%\ntop-5: {r['top5']:.3f}%\nloss: {r['loss']:.4f}"
    )
    return 0


def _add_predict(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--class-names", default=None, help="file with one class name per line")


def _run_predict(a: argparse.Namespace) -> int:
    model = _load_model(a.model, a.weights, a.img_size, a.num_classes)
    names = None
    if a.class_names:
        names = read_class_names(a.class_names)
        if len(names) != model.num_classes:
            raise ValueError(
                f"{a.class_names}: {len(names)} names for a model with {model.num_classes} classes"
            )
    elif model.num_classes == 1000:
        names = imagenet_class_names()
    preds = predict(model, a.images, topk=a.topk, img_size=a.img_size, crop_pct=a.crop_pct)
    rc = 0
    for path, pred in zip(a.images, preds, strict=True):
        if pred is None:
            print(f"error: {path}: cannot read the image", file=sys.stderr)
            rc = 2
            continue
        print(path)
        for idx, prob in pred:
            print(f"  {prob:7.2%}  {idx:4d}  {names[idx] if names else f'class {idx}'}")
    return rc


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="e.g. efficientvit_m0")
    p.add_argument("--weights", required=True, help=WEIGHTS_HELP)
    p.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="classifier size (default: from the converted directory, else the model's)",
    )
    p.add_argument("--img-size", type=int, default=None, help="crop size (default: the model's)")
    p.add_argument("--crop-pct", type=float, default=0.875, help="resize to img_size/crop_pct")


def _add_pack(p: argparse.ArgumentParser) -> None:
    p.add_argument("--src", required=True, help="image folder: <class>/<image>")
    p.add_argument("--out", required=True, help="output directory of the shards")
    p.add_argument("--num-shards", type=int, required=True)
    p.add_argument(
        "--resize-short",
        type=int,
        default=None,
        help="re-encode images whose shorter side is larger to this size (JPEG, once)",
    )
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images")


def _run_pack(a: argparse.Namespace) -> int:
    return main_pack(a.src, a.out, a.num_shards, a.resize_short, a.quality)


COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "convert": ("PyTorch (official/timm) checkpoint -> cga_jax", _add_convert, _run_convert),
    "export-torch": ("cga_jax weights -> PyTorch state dict", _add_export_torch, _run_export_torch),
    "export": ("serving artifact: jax.export (StableHLO) or ONNX", _add_export, _run_export),
    "eval": ("top-1/top-5/loss on an ImageNet-style folder", _add_eval, _run_eval),
    "predict": ("top-k classes of image files", _add_predict, _run_predict),
    "pack": ("image folder -> ArrayRecord shards for training", _add_pack, _run_pack),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cga-jax")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_, add, _) in COMMANDS.items():
        add(sub.add_parser(name, help=help_))
    args = parser.parse_args(argv)
    apply_cpu_flags(strict=False)  # XLA-CPU flags for every jit of this process (docs/bench.md)
    try:
        return COMMANDS[args.command][2](args)
    except (CheckpointError, FileNotFoundError, NotADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        if args.command not in ("eval", "predict", "pack"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
