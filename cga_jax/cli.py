"""``cga-jax`` console command: a dispatch table of subcommands.

Add a subcommand by writing ``_add_NAME(subparsers)`` + ``_run_NAME(args) -> int`` and an entry
in :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from cga_jax.weights import CheckpointError


def _add_convert(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="e.g. efficientvit_m4")
    p.add_argument(
        "--src",
        required=True,
        help="a .pth/.safetensors file, hf-hub:timm/efficientvit_m0.r224_in1k, "
        "official:efficientvit_m0 or an http(s)/file URL",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--num-classes", type=int, default=None, help="new classifier size (drops head)")
    p.add_argument("--img-size", type=int, default=None, help="resize attention-bias tables")


def _run_convert(a: argparse.Namespace) -> int:
    from cga_jax.convert import convert

    for note in convert(a.model, a.src, a.out, num_classes=a.num_classes, img_size=a.img_size):
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {a.out}")
    return 0


def _add_export_torch(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True)
    p.add_argument("--weights", required=True, help="a converted directory or any checkpoint")
    p.add_argument("--out", required=True, help="output .pth (or .safetensors)")
    p.add_argument("--layout", choices=("official", "timm"), default="official")


def _run_export_torch(a: argparse.Namespace) -> int:
    import json
    import os

    import torch

    from cga_jax.convert import atomic_write
    from cga_jax.torch_export import export_torch

    model = _load_model(a.model, a.weights)
    nbt = 0
    meta = os.path.join(a.weights, "config.json")
    if os.path.isdir(a.weights) and os.path.exists(meta):
        with open(meta) as f:
            nbt = json.load(f).get("num_batches_tracked", 0)
    sd = export_torch(model, a.layout, nbt)
    if a.out.endswith(".safetensors"):
        from safetensors.torch import save_file

        atomic_write(a.out, lambda path: save_file(sd, path))
    else:
        obj = {"model": sd} if a.layout == "official" else sd
        atomic_write(a.out, lambda path: torch.save(obj, path))
    print(f"wrote {a.out}")
    return 0


def _add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True)
    p.add_argument("--weights", default=None)
    p.add_argument("--out", required=True, help="output file (serialized jax.export artifact)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--no-fuse", action="store_true", help="keep BatchNorm unfolded")


def _run_export(a: argparse.Namespace) -> int:
    from cga_jax.convert import atomic_write
    from cga_jax.serving import export_serving

    model = _load_model(a.model, a.weights, img_size=a.img_size)
    data = export_serving(model, a.img_size, fuse=not a.no_fuse)

    def write(path: str) -> None:
        with open(path, "wb") as f:
            f.write(data)

    atomic_write(a.out, write)
    print(f"wrote {a.out} ({len(data)} bytes; input (b, {a.img_size}, {a.img_size}, 3) NHWC)")
    return 0


def _load_model(name: str, weights: str | None, img_size: int | None = None):
    import warnings

    from cga_jax.registry import create_model

    with warnings.catch_warnings(record=True) as notes:
        warnings.simplefilter("always")
        model = create_model(name, pretrained=weights, img_size=img_size)
    for n in notes:
        print(f"note: {n.message}", file=sys.stderr)
    return model


COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "convert": ("PyTorch (official/timm) checkpoint -> cga_jax", _add_convert, _run_convert),
    "export-torch": ("cga_jax weights -> PyTorch state dict", _add_export_torch, _run_export_torch),
    "export": ("jax.export serving artifact (StableHLO)", _add_export, _run_export),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cga-jax")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_, add, _) in COMMANDS.items():
        add(sub.add_parser(name, help=help_))
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command][2](args)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
