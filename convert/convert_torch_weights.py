"""Convert official / timm EfficientViT (MSRA) PyTorch weights to cga_jax (same as
``cga-jax convert``). Example::

    python convert/convert_torch_weights.py --model efficientvit_m4 \
        --src official:efficientvit_m4 --out weights/efficientvit_m4
"""

import sys

from cga_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
