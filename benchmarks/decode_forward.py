"""The ceiling of end to end without featurepipe's pipeline: threads that decode and run the network.

    python benchmarks/decode_forward.py --backbone mobilenet_v2 [--data DIR] [--n 1200] [--rounds 2]

In one process, with one thread per core and the LiteRT engine extract uses: the network alone on
images decoded beforehand, the decode (read bytes already in memory, decode, resize) alone, and
both in the same thread per image, as extract's reader threads do. Prints CPU ms per image and
images per second of each, and decode+network / network alone: what end to end can reach before
any pipeline cost (ordering, part files, the final HDF5 write).
"""

import argparse
import os
import sys
import threading
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = PROJECT.parent / "shared" / "datasets" / "flowers5"
DEFAULT_WEIGHTS = PROJECT.parent / "shared" / "weights"


def in_threads(work, n, threads):
    """(CPU ms per item, items per second) of ``work(i)`` for i < n, split over ``threads``."""
    cpu, wall = time.process_time(), time.perf_counter()
    workers = [threading.Thread(target=lambda k=k: [work(i) for i in range(k, n, threads)])
               for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return 1000 * (time.process_time() - cpu) / n, n / (time.perf_counter() - wall)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="mobilenet_v2")
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--n", type=int, default=1200, help="images (the first n of the folder)")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    if DEFAULT_WEIGHTS.is_dir():
        os.environ.setdefault("FEATUREPIPE_WEIGHTS", str(DEFAULT_WEIGHTS))
    from featurepipe.backbones import get_backbone
    from featurepipe.settings import make_spec
    from featurepipe.engines import FeatureModel
    from featurepipe.images import walk_images
    from featurepipe.reader import DEFAULT_DECODE, Target, decode_targets, read_bytes

    backbone = get_backbone(args.backbone)
    spec, resolved = make_spec(backbone)
    model = FeatureModel(backbone, spec, resolved, engine="litert")
    datas = [read_bytes(path) for path in walk_images(args.data)[:args.n]]
    targets = [Target(spec.image_size, spec.resize, DEFAULT_DECODE)]
    images = [decode_targets(data, targets)[0] for data in datas]
    n, threads = len(datas), model.engine.parallel
    print(f"{args.backbone}, {n} images of {Path(args.data).name}, {threads} threads, LiteRT")
    for _ in range(args.rounds):
        network = in_threads(lambda i: model.one(images[i]), n, threads)
        decode = in_threads(lambda i: decode_targets(datas[i], targets), n, threads)
        both = in_threads(lambda i: model.one(decode_targets(datas[i], targets)[0]), n, threads)
        for name, (ms, rate) in (("network alone", network), ("decode + resize alone", decode),
                                 ("decode + resize + network", both)):
            print(f"  {name:26} {ms:6.2f} CPU ms/img {rate:8.1f} img/s")
        print(f"  decode + network / network alone: {both[1] / network[1]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
