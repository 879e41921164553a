"""Extraction benchmark: engine forward rates, featurepipe end to end, the classic script, memory,
start-up, and seconds per compare row.

    python benchmarks/bench.py [--data DIR] [--backbone NAME ...] [--small 600] [--large 2400]

Every measurement runs in a fresh child process (so peak RSS and start-up are per run) on the same
images: ``--large`` images picked evenly from ``--data`` (default ``../shared/datasets/flowers5``)
and the first ``--small`` of them. End-to-end rates are marginal (``(large - small) / (t_large -
t_small)``), so start-up is excluded. Prints one Markdown table with the CPU model and core count
and saves it under ``benchmarks/results/``. Other programs running at the same time make every
number noisy: the load average before and after is printed with the table.
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))
DEFAULT_DATA = PROJECT.parent / "shared" / "datasets" / "flowers5"
DEFAULT_WEIGHTS = PROJECT.parent / "shared" / "weights"


# --------------------------------------------------------------------------- child measurements


def child_forward(backbone, data, batch_size, seconds, batch_sizes=None):
    """Images/s of each engine (and batch size) on decoded in-memory batches.

    Engines and batch sizes take turns in rounds, so load from other programs hits all alike.
    """
    import numpy as np

    from featurepipe.backbones import get_backbone
    from featurepipe.settings import make_spec
    from featurepipe.engines import ENGINES, ModelSource, available_engines, pixel_model
    from featurepipe.images import list_images
    from featurepipe.reader import load_image

    b = get_backbone(backbone)
    spec, resolved = make_spec(b)
    index = list_images(data)
    sizes = batch_sizes or [batch_size]
    n = 2 * max(sizes)
    images = np.stack([load_image(index.absolute(p), spec.image_size)[0] for p in index.paths[:n]])
    x = images  # engines take RGB pixels: preprocessing is part of their graph
    source = ModelSource(lambda: pixel_model(b, spec, resolved))
    names = available_engines()
    # one engine per batch size: LiteRT plans its memory for one input shape
    runs = {(name, size): ENGINES[name].make(source, spec) for size in sizes for name in names}
    if "litert" in names:  # the usual way to run LiteRT: one interpreter, every core, whole batches
        path = runs["litert", sizes[0]].path
        runs.update({("plain litert", size): PlainLiteRT(path, size) for size in sizes})
    batches = {size: [x[i:i + size] for i in range(0, n, size)] for size in sizes}
    for (name, size), engine in runs.items():
        engine.run(batches[size][0])  # warm-up
    spent, cpu = dict.fromkeys(runs, 0.0), dict.fromkeys(runs, 0.0)
    rounds = 0
    start = time.perf_counter()
    while rounds < 2 or time.perf_counter() - start < seconds * len(runs):
        for key, engine in runs.items():
            t, c = time.perf_counter(), time.process_time()
            for batch in batches[key[1]]:
                engine.run(batch)
            spent[key] += time.perf_counter() - t
            cpu[key] += time.process_time() - c
        rounds += 1
    rates, cpu_ms = {}, {}
    for (name, size), t in spent.items():
        rates.setdefault(size, {})[name] = rounds * n / t
        cpu_ms.setdefault(size, {})[name] = 1000 * cpu[name, size] / (rounds * n)
    return {"rates": rates, "cpu_ms": cpu_ms}


class PlainLiteRT:
    """A LiteRT interpreter on whole batches with ``num_threads`` = cores (the reference forward)."""

    def __init__(self, path, batch_size):
        from ai_edge_litert.interpreter import Interpreter

        self.it = Interpreter(model_path=str(path), num_threads=os.cpu_count())
        inp = self.it.get_input_details()[0]
        self.inp, self.out = inp["index"], self.it.get_output_details()[0]["index"]
        self.it.resize_tensor_input(self.inp, [batch_size, *inp["shape"][1:]], strict=True)
        self.it.allocate_tensors()

    def run(self, batch):
        self.it.set_tensor(self.inp, batch)
        self.it.invoke()
        return self.it.get_tensor(self.out)


def child_first_use(backbone, data):
    """Seconds to the first features with an empty cache (conversion + auto trial), and the choice."""
    import numpy as np

    from featurepipe.backbones import get_backbone
    from featurepipe.settings import make_spec
    from featurepipe.engines import FeatureModel, remembered_choice
    from featurepipe.images import list_images
    from featurepipe.reader import load_image

    start = time.perf_counter()
    b = get_backbone(backbone)
    spec, resolved = make_spec(b)
    index = list_images(data)
    model = FeatureModel(b, spec, resolved, engine="auto")
    model(np.stack([load_image(index.absolute(index.paths[0]), spec.image_size)[0]]))
    return {"seconds": time.perf_counter() - start, "engine": model.engine.name,
            "trial": (remembered_choice(spec) or {}).get("images_per_second")}


def child_startup(backbone, data):
    """Import, model load (from the cache) and the first image's features."""
    import numpy as np

    from featurepipe.backbones import get_backbone
    from featurepipe.settings import make_spec
    from featurepipe.engines import FeatureModel
    from featurepipe.images import list_images
    from featurepipe.reader import load_image

    b = get_backbone(backbone)
    spec, resolved = make_spec(b)
    index = list_images(data)
    model = FeatureModel(b, spec, resolved, engine="auto")
    model(np.stack([load_image(index.absolute(index.paths[0]), spec.image_size)[0]]))
    return {"engine": model.engine.name}


def child_extract(backbone, data, out, batch_size, decode="scaled"):
    """featurepipe.extract end to end (``backbone``: a name or a list, extracted together); also the
    time the forward pass waited for decoded images."""
    import featurepipe.chunks as chunks
    import featurepipe.engines as engines
    import featurepipe.extract as fx

    waited, forward = [0.0], [0.0]
    real_stream, real_call = chunks.read_images, engines.FeatureModel.__call__

    def timed_stream(*args, **kwargs):
        inner = real_stream(*args, **kwargs)
        try:
            while True:
                t = time.perf_counter()
                try:
                    item = next(inner)
                except StopIteration:
                    return
                waited[0] += time.perf_counter() - t
                yield item
        finally:
            inner.close()

    def timed_call(self, images):
        t = time.perf_counter()
        try:
            return real_call(self, images)
        finally:
            forward[0] += time.perf_counter() - t

    real_verify, verifying = fx.verify, [0.0, 0.0]

    def timed_verify(*args, **kwargs):  # a fixed cost (TF models built for a few rows): kept apart
        t, c = time.perf_counter(), time.process_time()
        try:
            return real_verify(*args, **kwargs)
        finally:
            verifying[0] += time.perf_counter() - t
            verifying[1] += time.process_time() - c

    chunks.read_images, fx.verify = timed_stream, timed_verify
    engines.FeatureModel.__call__ = timed_call
    names = [backbone] if isinstance(backbone, str) else backbone
    start, cpu = time.perf_counter(), time.process_time()
    results = fx.extract(data, names, out=out, quiet=True, engine="auto", batch_size=batch_size,
                         overwrite=True, decode=decode)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    from featurepipe.store import read_attrs

    # verify's time is left out of "seconds" and "cpu" (its variance swamped the marginal rates)
    return {"seconds": seconds - verifying[0], "cpu": cpu - verifying[1], "verify_seconds": verifying[0],
            "rows": results[0].n_rows, "decode_wait": waited[0],
            "forward": forward[0] - verifying[0], "engine": read_attrs(results[0].path)["engine"],
            "path": str(results[0].path), "paths": [str(r.path) for r in results]}


def child_decode(data, sizes, decode, n=100):
    """CPU ms per image of reading, decoding once and resizing to every size (one thread) with the
    reader: what one image costs a run with backbones of these input sizes."""
    from featurepipe.images import walk_images
    from featurepipe.reader import Target, read_image

    paths = walk_images(data)[:n]
    targets = [Target(size, decode=decode) for size in sizes]
    start = time.process_time()
    for path in paths:
        read_image(path, targets)
    return {"cpu_ms": 1000 * (time.process_time() - start) / len(paths), "n": len(paths)}


def child_classic(backbone, data, batch_size):
    """The classic script: image_dataset_from_directory + model.predict (network build excluded)."""
    import keras

    from featurepipe.backbones import PREPROCESS, build_feature_model, get_backbone
    from featurepipe.settings import make_spec

    b = get_backbone(backbone)
    spec, resolved = make_spec(b)
    model = build_feature_model(b, spec, resolved)
    mode = PREPROCESS[spec.preprocess]
    start, cpu = time.perf_counter(), time.process_time()
    ds = keras.utils.image_dataset_from_directory(data, labels="inferred", batch_size=batch_size,
                                                  image_size=(spec.image_size, spec.image_size),
                                                  shuffle=False, verbose=False)
    features = model.predict(ds.map(lambda x, y: mode(x)), verbose=0)
    return {"seconds": time.perf_counter() - start, "cpu": time.process_time() - cpu,
            "rows": int(features.shape[0])}


def child_compare(files):
    """Seconds per row of featurepipe.compare on the given feature files (None when absent)."""
    try:
        from featurepipe.compare import compare
    except ImportError:
        return {"seconds_per_row": None}
    start = time.perf_counter()
    rows = compare(files, quiet=True, plots=False)
    n = len(rows) if hasattr(rows, "__len__") else 0
    seconds = time.perf_counter() - start
    return {"seconds_per_row": seconds / n if n else None, "rows": n, "seconds": seconds}


CHILDREN = {"forward": child_forward, "first_use": child_first_use, "startup": child_startup,
            "extract": child_extract, "classic": child_classic, "compare": child_compare,
            "decode": child_decode}


def run_child(kind, env, **kwargs):
    """Run one measurement in a fresh process; return its JSON result with wall seconds and peak RSS."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", kind, json.dumps(kwargs)],
                          capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"benchmark step {kind} {kwargs} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall"] = wall
    return result


def child_main(kind, kwargs):
    result = CHILDREN[kind](**json.loads(kwargs))
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


# --------------------------------------------------------------------------- set-up and report


def subset_folders(data, work, small, large):
    """Symlink trees ``work/small`` and ``work/large`` (classes kept) of images picked evenly."""
    from featurepipe.images import list_images

    index = list_images(data)
    if len(index) < large:
        large = len(index)
        small = min(small, large // 4)
    step = len(index) / large
    picked = sorted({int(i * step) for i in range(large)})
    folders = {}
    for name, members in (("large", picked), ("small", picked[::max(1, len(picked) // small)][:small])):
        root = Path(work) / name
        for pos in members:
            rel = index.paths[pos]
            dest = root / index.class_names[index.labels[pos]] / rel.replace("/", "__")
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(index.absolute(rel), dest)
            if name == "large":
                Path(index.absolute(rel)).read_bytes()  # warm the page cache for every run alike
        folders[name] = (str(root), len(members))
    return folders


def cpu_model():
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions():
    from importlib import metadata

    out = []
    for dist in ("tensorflow", "keras", "ai-edge-litert"):
        try:
            out.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            out.append(f"{dist} missing")
    return ", ".join(out)


def measure_backbone(name, folders, env, args, log):
    (small_dir, n_small), (large_dir, n_large) = folders["small"], folders["large"]
    row = {"backbone": name}
    log(f"{name}: first use (conversion + auto trial)")
    row["first_use"] = run_child("first_use", env, backbone=name, data=small_dir)
    log(f"{name}: forward pass on in-memory batches")
    forward = run_child("forward", env, backbone=name, data=large_dir, batch_size=args.batch_size,
                        seconds=args.forward_seconds, batch_sizes=sorted({args.batch_size, 64}))
    row["forward"], row["forward_cpu_ms"] = forward["rates"], forward["cpu_ms"]
    log(f"{name}: start-up")
    row["startup"] = run_child("startup", env, backbone=name, data=small_dir)
    runs = {}
    for _ in range(args.repeat):  # alternate featurepipe and classic runs; keep each one's fastest
        for size, folder in (("small", small_dir), ("large", large_dir)):
            log(f"{name}: featurepipe extract, {size}")
            runs.setdefault(f"fp_{size}", []).append(run_child(
                "extract", env, backbone=name, data=folder,
                out=str(Path(args.work) / "features" / size), batch_size=args.batch_size))
            log(f"{name}: classic script, {size}")
            runs.setdefault(f"classic_{size}", []).append(run_child(
                "classic", env, backbone=name, data=folder, batch_size=args.batch_size))
    row.update({key: min(results, key=lambda r: r["seconds"]) for key, results in runs.items()})
    row["n"] = (n_small, n_large)
    return row


THREE = ("squeezenet", "mobilenet_v2", "efficientnet_lite0")


def measure_together(folders, env, args, log, backbones=THREE, decode="scaled"):
    """One extract with several backbones (each image decoded once) against separate runs."""
    row = {"backbones": list(backbones), "n": (folders["small"][1], folders["large"][1]), "decode": decode}
    # one output folder per row: an output folder holds the features of one data set
    work = Path(args.work) / "runs" / f"{Path(folders['small'][0]).parent.name}-{'+'.join(backbones)}-{decode}"
    log(f"{'+'.join(backbones)}: warm-up (LiteRT conversions and engine choices cached)")
    run_child("extract", env, backbone=list(backbones), data=folders["small"][0], decode=decode,
              out=str(work / "warm-up"), batch_size=args.batch_size)
    for size in ("small", "large"):
        folder = folders[size][0]
        log(f"{'+'.join(backbones)} together, {size} ({decode} decode)")
        row[f"together_{size}"] = run_child("extract", env, backbone=list(backbones), data=folder,
                                            out=str(work / "together" / size),
                                            batch_size=args.batch_size, decode=decode)
        if len(backbones) == 1:
            row[f"alone_{size}"] = row[f"together_{size}"]
            continue
        runs = []
        for b in backbones:
            log(f"{b} alone, {size} ({decode} decode)")
            runs.append(run_child("extract", env, backbone=b, data=folder, decode=decode,
                                  out=str(work / "alone" / size), batch_size=args.batch_size))
        row[f"alone_{size}"] = {"seconds": sum(r["seconds"] for r in runs), "cpu": sum(r["cpu"] for r in runs),
                                "per_backbone": runs}
    return row


def measure_limit(folders, env, args, log, backbones, decode):
    """Cores / (one decode + every network's CPU time) per image: the best rate possible here."""
    sizes = [_input_size(b) for b in backbones]
    log(f"decode CPU ms per image ({decode}, resized to {sizes} px)")
    decode_ms = run_child("decode", env, data=folders["large"][0], sizes=sizes, decode=decode)["cpu_ms"]
    net_ms = {}
    for b in backbones:
        log(f"{b}: network CPU ms per image")
        forward = run_child("forward", env, backbone=b, data=args.data, batch_size=args.batch_size,
                            seconds=args.forward_seconds, batch_sizes=[args.batch_size])
        net_ms[b] = min(ms for by_engine in forward["cpu_ms"].values()
                        for engine, ms in by_engine.items() if engine in ("tf", "litert"))
    return {"decode_ms": decode_ms, "net_ms": net_ms,
            "limit": os.cpu_count() * 1000 / (decode_ms + sum(net_ms.values()))}


def _input_size(backbone):
    from featurepipe.backbones import get_backbone

    return get_backbone(backbone).input_size


def extra_table(extra):
    lines = ["| run | one extract, img/s | separate runs, img/s | one / separate | limit img/s "
             "(cores / (decode + networks), CPU ms per image) | one extract / limit |",
             "|---|---:|---:|---:|---:|---:|"]
    for title, row, limit in extra:
        lines += together_table(title, row, limit)
    lines += ["", "Rates are marginal (extra images / extra seconds between the small and the large "
                  "run, start-up and the final verify step excluded). Separate runs: one process per "
                  "backbone, their seconds added. Limit: decode = reading one file, decoding it "
                  "once and resizing to every backbone's size; networks = featurepipe's engine on "
                  "decoded flowers5 images in memory, CPU ms per image."]
    return "\n".join(lines)


def together_table(title, row, limit=None):
    n_small, n_large = row["n"]
    together = marginal(row["together_small"], row["together_large"], n_small, n_large)
    alone = marginal(row["alone_small"], row["alone_large"], n_small, n_large)
    lines = [f"| {title} | {together:.1f} | {alone:.1f} | {together / alone:.2f}× |"
             + (f" {limit['limit']:.1f} ({limit['decode_ms']:.0f} + "
                f"{' + '.join(f'{v:.0f}' for v in limit['net_ms'].values())} CPU ms) | {together / limit['limit']:.2f} |"
                if limit else " | |")]
    return lines


def photo_rows(photos, env, args, log):
    """Rows on large photos: one backbone and three together (scaled decode), and exact decoding."""
    folders = subset_folders(photos, Path(args.work) / "photos", args.photos_small, args.photos_large)
    saved = args.data
    rows = []
    for backbones, decode in (((args.photo_backbone,), "scaled"), ((args.photo_backbone,), "exact"),
                              (THREE, "scaled")):
        together = measure_together(folders, env, args, log, backbones, decode)
        args.data = str(Path(args.work) / "large")  # networks' CPU time: on flowers5's small images
        limit = measure_limit(folders, env, args, log, backbones, decode)
        args.data = saved
        rows.append((f"{folders['large'][1]} photos 4032x3024, {'+'.join(backbones)}, {decode} decode",
                     together, limit))
    return rows


def marginal(small, large, n_small, n_large, key="seconds"):
    """Images per second of the extra images of the large run (start-up cancels out); nan when the
    large run was not slower (noise larger than the difference)."""
    extra = large[key] - small[key]
    return (n_large - n_small) / extra if extra > 0 else float("nan")


def best_rates(rates_by_size):
    """{engine: its best img/s over the measured batch sizes}."""
    best = {}
    for by_engine in rates_by_size.values():
        for engine, rate in by_engine.items():
            best[engine] = max(best.get(engine, 0.0), rate)
    return best


def table(rows, compare_row, header):
    lines = [header, "",
             "| network | engine (auto) | forward img/s TF / plain LiteRT / featurepipe LiteRT "
             "| featurepipe end-to-end img/s (whole large run) | classic script img/s (whole large run) "
             "| end-to-end / best forward (featurepipe engines) | end-to-end / best plain forward "
             "| end-to-end / classic | CPU ms/img forward / end-to-end / classic | cores busy | decode wait "
             "| peak RSS MB small → large | start-up s | first use s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        n_small, n_large = r["n"]
        fwd = best_rates(r["forward"])
        fwd_cpu = min(min(by_engine.values()) for by_engine in r["forward_cpu_ms"].values())
        e2e = marginal(r["fp_small"], r["fp_large"], n_small, n_large)
        classic = marginal(r["classic_small"], r["classic_large"], n_small, n_large)
        e2e_cpu = 1000 / marginal(r["fp_small"], r["fp_large"], n_small, n_large, key="cpu")
        classic_cpu = 1000 / marginal(r["classic_small"], r["classic_large"], n_small, n_large, key="cpu")
        big, small = r["fp_large"], r["fp_small"]
        rates = " / ".join(f"{fwd[k]:.0f}" if k in fwd else "n/a" for k in ("tf", "plain litert", "litert"))
        # per-image engines run the network inside the decode threads: no separate wait to measure
        wait = f"{100 * big['decode_wait'] / big['seconds']:.1f} %" if big["engine"] == "tf" else "n/a"
        ours = max(fwd[k] for k in ("tf", "litert") if k in fwd)
        plain = max(fwd[k] for k in ("tf", "plain litert") if k in fwd)
        lines.append(
            f"| {r['backbone']} | {big['engine']} | {rates} "
            f"| {e2e:.0f} ({n_large / big['wall']:.0f}) | {classic:.0f} ({n_large / r['classic_large']['wall']:.0f}) "
            f"| {e2e / ours:.2f} | {e2e / plain:.2f} | {e2e / classic:.2f} "
            f"| {fwd_cpu:.1f} / {e2e_cpu:.1f} / {classic_cpu:.1f} "
            f"| {(big['cpu'] - small['cpu']) / (big['seconds'] - small['seconds']):.2f} of {os.cpu_count()} "
            f"| {wait} "
            f"| {small['peak_rss_mb']:.0f} → {big['peak_rss_mb']:.0f} (+{big['peak_rss_mb'] - small['peak_rss_mb']:.0f}) "
            f"| {r['startup']['wall']:.1f} | {r['first_use']['seconds']:.1f} |")
    per_row = compare_row.get("seconds_per_row") if compare_row else None
    lines += ["", f"Fit side: {per_row:.1f} s per `compare` row ({compare_row['rows']} rows on the large "
                  "feature files)." if per_row else "Fit side: `featurepipe.compare` not available in this checkout."]
    lines += ["", "End-to-end and classic rates are marginal (extra images / extra seconds between the small "
                  "and the large run: start-up and the final verify step excluded; in brackets the large run's images / its whole "
                  "process time, start-up and the final verify included); forward = the engine alone on decoded in-memory "
                  "batches (preprocessing is in the graph), best of the extract batch size and 64; plain LiteRT = one interpreter "
                  "with every core on whole batches (how LiteRT is usually run), featurepipe LiteRT = one "
                  "single-threaded interpreter per core, one image per invoke; cores busy = CPU seconds / wall seconds of the extra images (the cores never sit idle waiting for "
                  "decoding when it is near the core count); decode wait = time the batched forward pass waited "
                  "for decoded images / run time (tf engine; litert decodes and runs each image in one thread); start-up = a fresh process importing featurepipe, loading the "
                  "model from the cache and extracting one image; first use = the same with an empty cache "
                  "(LiteRT conversion + auto trial)."]
    return "\n".join(lines)


def forward_sweep_table(rows):
    engines = ("tf", "plain litert", "litert")
    lines = ["| network | batch | " + " | ".join(f"{e} img/s" for e in engines) + " | "
             + " | ".join(f"{e} CPU ms/img" for e in engines) + " |",
             "|---|---:|" + "---:|" * (2 * len(engines))]
    for r in rows:
        for size, rates in r["rates"].items():
            cpu = r["cpu_ms"][size]
            cells = [f"{rates.get(e, float('nan')):.0f}" for e in engines]
            cells += [f"{cpu.get(e, float('nan')):.1f}" for e in engines]
            lines.append(f"| {r['backbone']} | {size} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA), help="image folder (class folders)")
    p.add_argument("--backbone", action="append", help="default: mobilenet_v2 squeezenet")
    p.add_argument("--small", type=int, default=600)
    p.add_argument("--large", type=int, default=2400)
    p.add_argument("--batch-size", type=int, default=None, help="default: extract's default")
    p.add_argument("--forward-seconds", type=float, default=4.0, help="per engine and batch size")
    p.add_argument("--repeat", type=int, default=1, help="end-to-end runs of each kind (fastest kept)")
    p.add_argument("--sweep", nargs="+", type=int, metavar="BATCH",
                   help="only measure forward rates at these batch sizes")
    p.add_argument("--results", default=str(PROJECT / "benchmarks" / "results"))
    p.add_argument("--three", action="store_true",
                   help=f"add a row: {' + '.join(THREE)} in one extract against three separate runs")
    p.add_argument("--photos", metavar="DIR", help="add large-photo rows on DIR (made by "
                   "benchmarks/decode_scale.py --make DIR)")
    p.add_argument("--photos-small", type=int, default=50)
    p.add_argument("--photos-large", type=int, default=200)
    p.add_argument("--photo-backbone", default="mobilenet_v2")
    p.add_argument("--only-extra", action="store_true", help="only the --three and --photos rows")
    args = p.parse_args(argv)
    if not Path(args.data).is_dir():
        sys.exit(f"error: no data folder '{args.data}'; pass --data DIR")
    from featurepipe.engines import DEFAULT_BATCH_SIZE

    args.batch_size = args.batch_size or DEFAULT_BATCH_SIZE
    backbones = args.backbone or ["mobilenet_v2", "squeezenet"]
    env = dict(os.environ)
    if not env.get("FEATUREPIPE_WEIGHTS") and DEFAULT_WEIGHTS.is_dir():
        env["FEATUREPIPE_WEIGHTS"] = str(DEFAULT_WEIGHTS)
    started, load_before = time.time(), os.getloadavg()

    def log(msg):
        print(f"[{time.time() - started:5.0f} s] {msg}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="featurepipe-bench-") as work:
        args.work = work
        env.update(FEATUREPIPE_CACHE=str(Path(work) / "cache"), FEATUREPIPE_DATA=str(Path(work) / "home"),
                   FEATUREPIPE_MODELS=str(Path(work) / "models"))
        folders = subset_folders(args.data, work, args.small, args.large)
        if args.sweep:
            rows = [{"backbone": b, **run_child("forward", env, backbone=b, data=folders["large"][0],
                                                batch_size=args.batch_size, seconds=args.forward_seconds,
                                                batch_sizes=args.sweep)} for b in backbones]
            print(forward_sweep_table(rows))
            return 0
        rows, compare_row = [], None
        if not args.only_extra:
            rows = [measure_backbone(b, folders, env, args, log) for b in backbones]
            log("compare on the large feature files")
            compare_row = run_child("compare", env, files=[r["fp_large"]["path"] for r in rows])
        extra = []
        if args.three:
            extra.append((f"{folders['large'][1]} flowers5 images, {'+'.join(THREE)}",
                          measure_together(folders, env, args, log), None))
        if args.photos:
            extra += photo_rows(args.photos, env, args, log)
    header = (f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {cpu_model()}, "
              f"{os.cpu_count()} cores ({platform.system()}), {versions()}; batch {args.batch_size}; "
              f"best of {args.repeat}; "
              f"{folders['small'][1]} and {folders['large'][1]} images of {Path(args.data).name}; "
              f"load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after "
              f"({time.time() - started:.0f} s).")
    text = table(rows, compare_row, header) if rows else header
    if extra:
        text += "\n\n" + extra_table(extra)
    print(text)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench-{datetime.now(timezone.utc):%Y%m%d-%H%M}.md"
    path.write_text(text + "\n")
    path.with_suffix(".json").write_text(json.dumps({"rows": rows, "compare": compare_row,
                                                     "extra": extra}, indent=1))
    log(f"saved {path}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child_main(sys.argv[2], sys.argv[3])
    else:
        sys.exit(main())
