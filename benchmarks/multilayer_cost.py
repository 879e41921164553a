"""Forward cost of reading several layers in one pass against one layer.

    python benchmarks/multilayer_cost.py --backbone mobilenet_v2 \
        --layers out_relu block_16_project_BN block_15_add [--engine litert] [--images 128]

Times ``FeatureModel`` on the same random images (best of 3 after a warm-up) with the default
layer alone and with all ``--layers`` from one forward pass; prints img/s of both and the ratio.
"""

import argparse
import os
import sys
import time

import numpy as np

from featurepipe.backbones import get_backbone
from featurepipe.settings import make_spec, with_layers
from featurepipe.engines import FeatureModel


def rate(model, images, rounds=3):
    model(images[:8])  # warm-up: build, convert, allocate
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        model(images)
        best = min(best, time.perf_counter() - started)
    return len(images) / best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", required=True)
    p.add_argument("--layers", nargs="+", required=True)
    p.add_argument("--engine", default="litert")
    p.add_argument("--images", type=int, default=128)
    args = p.parse_args(argv)
    backbone = get_backbone(args.backbone)
    spec, resolved = make_spec(backbone)
    size = spec.image_size
    images = np.random.default_rng(0).integers(0, 256, (args.images, size, size, 3), dtype=np.uint8)
    one = rate(FeatureModel(backbone, spec, resolved, engine=args.engine), images)
    several = rate(FeatureModel(backbone, with_layers(spec, args.layers), resolved, engine=args.engine),
                   images)
    load = os.getloadavg()[0]
    print(f"{args.backbone} ({args.engine}): 1 layer {one:.0f} img/s, {len(args.layers)} layers "
          f"{several:.0f} img/s, cost ratio {one / several:.2f} (load average {load:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
