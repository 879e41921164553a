"""Scaled JPEG decoding on large photos: time per photo and how close the features stay.

    python benchmarks/decode_scale.py --make /tmp/photos12mp --n 200     # make the photos once
    python benchmarks/decode_scale.py --photos /tmp/photos12mp [--backbone mobilenet_v2]

``--make`` upscales photos picked evenly from flowers5 to 4032x3024 (a phone camera's 12 MP),
adds a little noise (sigma 3) and saves them as JPEG quality 90 in class folders. The measurement
decodes every photo exactly and at each DCT scale libjpeg offers (1/2, 1/4, 1/8; what a margin
gives is printed), resizes to the network's input and reports single-thread milliseconds per photo
(decode + resize) and the cosine between each photo's features and its exactly decoded features.
"""

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))
DEFAULT_DATA = PROJECT.parent / "shared" / "datasets" / "flowers5"
DEFAULT_WEIGHTS = PROJECT.parent / "shared" / "weights"
LARGE = (4032, 3024)


def _make_one(job):
    import numpy as np
    from PIL import Image

    src, dst, seed = job
    rng = np.random.default_rng(seed)
    big = np.asarray(Image.open(src).convert("RGB").resize(LARGE, Image.BICUBIC), dtype=np.int16)
    noisy = np.clip(big + rng.normal(0, 3, big.shape).astype(np.int16), 0, 255).astype(np.uint8)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")  # a killed --make leaves no cut-short photo
    Image.fromarray(noisy).save(tmp, format="JPEG", quality=90)
    os.replace(tmp, dst)


def make_photos(out, n, data=DEFAULT_DATA):
    """``n`` 12 MP JPEGs in ``out/<class>/`` made from photos picked evenly from ``data``; photos
    already there are kept (each is written under a temporary name and renamed, so one that exists
    is whole), temporary files of a killed run are removed."""
    from multiprocessing import Pool

    from featurepipe.images import list_images

    index = list_images(data)
    step = max(1, len(index) // n)
    picked = index.paths[::step][:n]
    jobs = [(index.absolute(p), Path(out) / Path(p).with_suffix(".jpg"), i) for i, p in enumerate(picked)]
    for stale in Path(out).glob("*/.*.tmp-*"):
        stale.unlink()
    with Pool(os.cpu_count() or 1) as pool:
        pool.map(_make_one, [j for j in jobs if not j[1].exists()])
    return len(jobs)


def measure(photos, backbone, margins):
    import numpy as np

    from featurepipe.backbones import get_backbone
    from featurepipe.settings import make_spec
    from featurepipe.engines import FeatureModel
    from featurepipe.images import walk_images
    from featurepipe.reader import decode_bytes, resize_array

    spec, resolved = make_spec(get_backbone(backbone))
    model = FeatureModel(get_backbone(backbone), spec, resolved, engine="tf")
    size = spec.image_size
    paths = walk_images(photos)
    settings = {"exact": 0} | {f"margin {m:g}": int(np.ceil(size * m)) for m in margins}
    seconds = {name: [] for name in settings}
    shapes = {name: set() for name in settings}
    arrays = {name: [] for name in settings}
    for path in paths:
        data = Path(path).read_bytes()
        for name, side in settings.items():  # interleaved, so load from others hits all alike
            start = time.process_time()
            rgb = decode_bytes(data, draft_side=side)
            small = resize_array(rgb, size)
            seconds[name].append(time.process_time() - start)
            shapes[name].add(rgb.shape[:2])
            arrays[name].append(small)
    feats = {name: np.concatenate([model(np.stack(a[i:i + 32])) for i in range(0, len(a), 32)])
             for name, a in arrays.items()}
    exact = feats["exact"] / np.linalg.norm(feats["exact"], axis=1, keepdims=True)
    print(f"{len(paths)} photos, {backbone} ({size} px input), decode+resize CPU ms per photo "
          "(one thread), cosine to exact decoding per photo")
    print("| decode | decoded size | ms/photo (median) | cosine min | cosine 1st pct | cosine mean | mean pixel diff |")
    print("|---|---|---|---|---|---|---|")
    for name in settings:
        f = feats[name] / np.linalg.norm(feats[name], axis=1, keepdims=True)
        cos = (f * exact).sum(axis=1)
        diff = np.mean([np.abs(a.astype(int) - b.astype(int)).mean()
                        for a, b in zip(arrays[name], arrays["exact"])])
        print(f"| {name} | {', '.join(f'{w}x{h}' for h, w in sorted(shapes[name]))} | "
              f"{1000 * np.median(seconds[name]):.1f} | {cos.min():.4f} | {np.percentile(cos, 1):.4f} | "
              f"{cos.mean():.4f} | {diff:.2f} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--make", metavar="DIR", help="make the 12 MP photos in DIR and exit")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--photos", metavar="DIR")
    p.add_argument("--backbone", default="mobilenet_v2")
    p.add_argument("--margin", type=float, action="append", help="decoded side / input size (repeatable)")
    args = p.parse_args(argv)
    os.environ.setdefault("FEATUREPIPE_WEIGHTS", str(DEFAULT_WEIGHTS))
    if args.make:
        print(f"{make_photos(args.make, args.n, args.data)} photos in {args.make}")
        return 0
    measure(args.photos, args.backbone, args.margin or [1.0, 2.0, 4.0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
