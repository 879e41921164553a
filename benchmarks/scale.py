"""Time compare, audit, report and predict at scale, each in a fresh process, with peak memory.

    python benchmarks/scale.py --rows 10000 100000 --classes 100 --stages audit report --out /tmp/scale
    python benchmarks/scale.py --rows 1000 10000 --stages predict --out /tmp/scale
    python benchmarks/scale.py --rows 1000000 --backbones efficientnet_lite0 --stages compare --clf logreg knn
    python benchmarks/scale.py --rows 100000 --stages compare --dask-workers 2 --dask-memory-gb 3

For each row count it writes feature files in the documented HDF5 contract (featurepipe.store's
writer, a chunk of rows at a time, so writing 1M rows needs no more memory than one chunk), one
per backbone (``--backbones``; default the three default backbones: squeezenet 512,
efficientnet_lite0 1280, efficientnet_lite2 1280 dimensions) with a 20 % test split:

* **Geometry**: a Gaussian mixture in a 64-dimensional latent space (``--classes`` centres that
  overlap, so accuracy is well below 1.0), mapped into each backbone's width by its own random
  matrix and a ReLU (non-negative, like pooled CNN features), plus per-backbone noise; 0.5 % of the
  rows are near-copies of another row (some across splits: leaks) and 2 % carry a wrong label, so
  the audit has something to find.
* **Photos**: the report shows thumbnails, so every row's path exists: a pool of 256 small JPEGs
  (64 px) hard-linked under ``<out>/<N>/images/<class>/<row>.jpg`` (a link per row costs a
  directory entry, not a copy).

Stages (``--stages``, in this order), each ``featurepipe <stage> ...`` in a fresh process, timed
with its peak RSS (``wait4``'s ``ru_maxrss``: the largest single process among it and its
children) and the sampled peak RSS of its whole process tree (psutil, every 0.5 s):

* ``compare``: ``featurepipe compare --features <the files>`` (default classifiers, or ``--clf
  ...``); with ``--dask-workers N`` the harness starts a ``LocalCluster`` of N worker processes
  (one thread, ``--dask-memory-gb`` each) and adds ``--dask <its address>``: the workers' peak RSS
  is sampled and noted (the largest one), the client's is the stage's own;
* ``fit``: ``featurepipe fit --clf nb --cv 2`` on the joined files (naive Bayes on 32 PCA axes: a
  cheap model) for the audit's re-scoring and the report's best-model section when compare did not
  leave one;
* ``audit``: ``featurepipe audit --features <the files>``;
* ``report``: ``featurepipe report --features <the files>`` (the page size is noted);
* ``predict``: ``featurepipe predict FOLDER --csv OUT`` on N small JPEGs (links to the pool)
  with a squeezenet + logreg model fitted on a small labelled folder made here.

A stage that fails, is killed, runs past ``--timeout`` or holds more than ``--max-rss-gb`` (then the
harness kills it, rather than let the kernel's OOM killer choose on a shared machine) is recorded
(status, last stderr line); the harness itself goes on. It prints one Markdown table and saves it as ``<out>/scale-<date>.md``.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

BACKBONE_DIMS = {"squeezenet": 512, "efficientnet_lite0": 1280, "efficientnet_lite2": 1280}
STAGES = ("compare", "fit", "audit", "report", "predict")
LATENT = 64
CHUNK_ROWS = 20_000
POOL_IMAGES = 256
COPY_SHARE = 0.005
WRONG_SHARE = 0.02


# --------------------------------------------------------------------------- data


def class_centres(n_classes, *, seed):
    """(n_classes, LATENT) centres: spread so neighbouring classes overlap."""
    rng = np.random.default_rng(seed)
    return rng.normal(0, 0.55, (n_classes, LATENT)).astype(np.float32)


def row_plan(n_rows, n_classes, *, seed):
    """Labels (balanced, rows sorted by class), splits (20 % test), copy sources, flipped labels."""
    rng = np.random.default_rng(seed + 1)
    true = (np.arange(n_rows) * n_classes // n_rows).astype(np.int32)
    split = np.where(rng.random(n_rows) < 0.2, "test", "train").astype(object)
    source = np.full(n_rows, -1, np.int64)  # row i repeats row source[i] (a near-copy)
    copies = rng.choice(n_rows, int(n_rows * COPY_SHARE), replace=False)
    for i in copies:  # the source: another row of the same class
        lo, hi = np.searchsorted(true, true[i]), np.searchsorted(true, true[i], side="right")
        j = int(rng.integers(lo, hi))
        if j != i and source[j] < 0:
            source[i] = j
    given = true.copy()
    wrong = rng.choice(n_rows, int(n_rows * WRONG_SHARE), replace=False)
    given[wrong] = (true[wrong] + rng.integers(1, n_classes, len(wrong))) % n_classes
    return true, given, split, source


def latent_rows(rows, true, centres, source, *, seed):
    """Latent vectors (len(rows), LATENT) for row indices ``rows``; a copy uses its source's draw."""
    origin = np.where(source[rows] >= 0, source[rows], rows)
    z = np.empty((len(rows), LATENT), np.float32)
    for k, r in enumerate(origin):  # one generator per row: the same draw whichever chunk asks
        z[k] = np.random.default_rng((seed, int(r))).normal(0, 1, LATENT)
    z += centres[true[origin]]
    is_copy = source[rows] >= 0
    z[is_copy] += np.random.default_rng((seed, 7, int(rows[0]))).normal(0, 0.03, (int(is_copy.sum()), LATENT))
    return z


def write_feature_files(folder, *, n_rows, n_classes, backbones, seed=0, data_root=""):
    """One contract feature file per backbone in ``folder``, written CHUNK_ROWS rows at a time."""
    from featurepipe.store import FeatureFileWriter

    folder.mkdir(parents=True, exist_ok=True)
    true, given, split, source = row_plan(n_rows, n_classes, seed=seed)
    centres = class_centres(n_classes, seed=seed)
    names = [f"c{c:04d}" for c in range(n_classes)]
    paths = np.array([f"{names[c]}/{i:07d}.jpg" for i, c in enumerate(true)], dtype=object)
    files = []
    writers = {}
    for b in backbones:
        dim = BACKBONE_DIMS[b]
        attrs = {"backbone": b, "layer": "", "pooling": "avg", "image_size": 224, "resize": "stretch",
                 "preprocess": "synthetic", "augment": "none", "weights_sha256": "", "feature_dim": dim,
                 "data_root": str(data_root), "engine": "synthetic (benchmarks/scale.py)",
                 "n_rows": n_rows}
        writers[b] = FeatureFileWriter(folder / f"{b}.h5", n_rows=n_rows, dim=dim, class_names=names, attrs=attrs)
    mix = {b: np.random.default_rng((seed, 11, k)).normal(0, 1 / np.sqrt(LATENT), (LATENT, BACKBONE_DIMS[b]))
           .astype(np.float32) for k, b in enumerate(backbones)}
    try:
        for start in range(0, n_rows, CHUNK_ROWS):
            rows = np.arange(start, min(n_rows, start + CHUNK_ROWS))
            z = latent_rows(rows, true, centres, source, seed=seed)
            for k, b in enumerate(backbones):
                noise = np.random.default_rng((seed, 13, k, start)).normal(0, 0.35, (len(rows), BACKBONE_DIMS[b]))
                X = np.maximum(z @ mix[b] + noise.astype(np.float32), 0)
                writers[b].write_rows(rows, features=X, labels=given[rows], paths=paths[rows], split=split[rows],
                                      file_size=np.zeros(len(rows), np.int64), mtime_ns=np.zeros(len(rows), np.int64),
                                      sha1=np.array(["0" * 40] * len(rows), dtype=object))
        for b in backbones:
            writers[b].write_skipped([])
            writers[b].commit()
            files.append(folder / f"{b}.h5")
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    return files, paths


def make_pool(folder, n=POOL_IMAGES, *, px=64, seed=0):
    """``n`` small JPEGs (smooth colour fields, a few shapes) in ``folder``; their paths."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        path = folder / f"pool_{k:04d}.jpg"
        if not path.exists():
            base = rng.integers(0, 256, 3)
            img = Image.new("RGB", (px, px), tuple(int(v) for v in base))
            draw = ImageDraw.Draw(img)
            for _ in range(3):
                x0, y0 = rng.integers(0, px - 8, 2)
                w, h = (int(v) for v in rng.integers(8, px // 2, 2))
                draw.ellipse([int(x0), int(y0), int(x0) + w, int(y0) + h],
                             fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
            img.save(path, quality=85)
        out.append(path)
    return out


def link_images(root, rel_paths, pool):
    """Hard-link a pool image at ``root/<rel path>`` for every row (skips links already there)."""
    made = set()
    for k, rel in enumerate(rel_paths):
        target = root / rel
        parent = target.parent
        if parent not in made:
            parent.mkdir(parents=True, exist_ok=True)
            made.add(parent)
        if not target.exists():
            os.link(pool[k % len(pool)], target)


# --------------------------------------------------------------------------- measuring


def run_stage(cmd, *, env, timeout, log, max_rss_gb=16.0, cluster=None):
    """Run ``cmd`` in a fresh process group; dict(status, seconds, peak_rss_gb, tree_rss_gb, last).

    The group is killed past ``timeout`` seconds, or when its processes together hold more than
    ``max_rss_gb`` (sampled every 0.2 s: a stage that would need more than the machine has is
    recorded as such instead of waking the kernel's OOM killer on a shared machine). With
    ``cluster`` (the Dask cluster's process), its worker processes are sampled too: the largest
    one's peak is ``worker_rss_gb`` and they count towards ``max_rss_gb``.
    """
    import psutil

    started = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=err, stderr=subprocess.STDOUT, start_new_session=True)
        tree_peak = [0]
        worker_peak = [0]
        over = threading.Event()
        done = threading.Event()

        def sample():
            while not done.wait(0.2):
                try:
                    top = psutil.Process(proc.pid)
                    procs = [top] + top.children(recursive=True)
                    tree_peak[0] = max(tree_peak[0], sum(_rss(p) for p in procs))
                except psutil.Error:
                    pass
                workers = [_rss(p) for p in _children(cluster)]
                worker_peak[0] = max([worker_peak[0], *workers])
                if tree_peak[0] + sum(workers) > max_rss_gb * 2**30 and not over.is_set():
                    over.set()
                    _kill_group(proc.pid)

        def stop():
            if not done.wait(timeout):
                _kill_group(proc.pid)

        threads = [threading.Thread(target=sample, daemon=True), threading.Thread(target=stop, daemon=True)]
        for t in threads:
            t.start()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        done.set()
        proc.returncode = os.waitstatus_to_exitcode(status)
    code = proc.returncode
    timed_out = seconds >= timeout
    text = Path(log).read_text(errors="replace").strip().splitlines()
    last = next((line for line in reversed(text) if line.strip()), "")
    state = "ok" if code == 0 else (
        "timeout" if timed_out else f"killed by the harness: over {max_rss_gb:g} GB" if over.is_set()
        else f"killed (signal {-code})" if code < 0 else f"exit {code}")
    return {"status": state, "seconds": round(seconds, 1), "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2),
            "tree_rss_gb": round(tree_peak[0] / 2**30, 2), "last": last[-160:],
            **({"worker_rss_gb": round(worker_peak[0] / 2**30, 2)} if cluster else {})}


def _children(process):
    import psutil

    try:
        return process.children(recursive=True) if process else []
    except psutil.Error:
        return []


class DaskCluster:
    """A LocalCluster of ``workers`` processes (one thread, ``memory_gb`` each) in its own process.

    ``address`` is its scheduler; ``process`` the psutil handle whose children are the workers.
    """

    def __init__(self, workers, memory_gb, *, folder, env):
        import psutil

        folder.mkdir(parents=True, exist_ok=True)
        address_file = folder / "dask-address"
        address_file.unlink(missing_ok=True)
        # the cluster lives in its own session (a stage's kill must not reach it) and ends by itself
        # when the harness goes away, however the harness ends
        script = ("import os, time\nfrom distributed import LocalCluster\n"
                  f"c = LocalCluster(n_workers={workers}, threads_per_worker=1, memory_limit='{memory_gb}GB', "
                  "dashboard_address=None)\n"
                  f"open({str(address_file)!r} + '.tmp', 'w').write(c.scheduler_address)\n"
                  f"os.replace({str(address_file)!r} + '.tmp', {str(address_file)!r})\n"
                  f"while os.getppid() == {os.getpid()}:\n    time.sleep(1)\n"
                  "c.close()\n")
        self.log = open(folder / "dask-cluster.log", "w")
        self.popen = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=self.log,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        try:
            for _ in range(600):
                if address_file.exists() or self.popen.poll() is not None:
                    break
                time.sleep(0.2)
            if not address_file.exists():
                raise RuntimeError(f"the Dask cluster did not start: see {folder / 'dask-cluster.log'}")
        except BaseException:
            self.close()
            raise
        self.address = address_file.read_text().strip()
        self.process = psutil.Process(self.popen.pid)

    def close(self):
        _kill_group(self.popen.pid)
        self.popen.wait()
        self.log.close()


def _kill_group(pid):
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _rss(p):
    import psutil

    try:
        return p.memory_info().rss
    except psutil.Error:
        return 0


def featurepipe(*args):
    return [sys.executable, "-m", "featurepipe", *map(str, args)]


def stage_env(home):
    env = dict(os.environ, FEATUREPIPE_MODELS=str(home / "models"), FEATUREPIPE_DATA=str(home / "data"),
               FEATUREPIPE_CACHE=str(home / "cache"), PYTHONPATH=os.pathsep.join(
                   [str(PROJECT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    return env


def predict_setup(base, env, *, timeout):
    """A squeezenet + logreg model fitted on a small labelled folder of pool images; the model path."""
    labelled = base / "predict-train" / "pool3"
    pool = make_pool(base / "pool")
    if not labelled.exists():
        for k, src in enumerate(pool[:120]):
            target = labelled / f"class{k % 3}" / src.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, target)
    feats = base / "predict-features"
    models = Path(env["FEATUREPIPE_MODELS"]) / feats.name  # the dataset is named after the features' folder
    found = sorted(models.glob("*.skops")) if models.exists() else []
    if found:
        return found[0]
    for cmd in (featurepipe("extract", "--data", labelled, "--backbone", "squeezenet", "--out", feats),
                featurepipe("fit", "--features", feats / "squeezenet.h5", "--clf", "logreg", "--cv", "2")):
        result = run_stage(cmd, env=env, timeout=timeout, log=base / "predict-setup.log")
        if result["status"] != "ok":
            raise RuntimeError(f"predict setup failed: {' '.join(map(str, cmd))}: {result['last']}")
    return sorted(models.glob("*.skops"))[0]


def stage_command(stage, files, home, *, n_rows, model=None, clf=(), dask=None):
    if stage == "compare":
        return featurepipe("compare", "--features", *files, *(["--clf", *clf] if clf else []),
                           *(["--dask", dask] if dask else []))
    if stage == "fit":
        return featurepipe("fit", "--features", *files, "--clf", "nb", "--cv", "2")
    if stage == "audit":
        return featurepipe("audit", "--features", *files)
    if stage == "report":
        return featurepipe("report", "--features", *files)
    if stage == "predict":
        return featurepipe("predict", home / "predict-images", "--model", model, "--csv", home / "predict.csv")
    raise ValueError(stage)


def prepare(home, *, n_rows, n_classes, backbones, seed, need_images):
    """The feature files (written when missing) and, when a stage shows photos, the linked images."""
    folder = home / "features" / f"scale{n_rows}"
    files = [folder / f"{b}.h5" for b in backbones]
    images = home / "images"
    marker = folder / ".complete.json"
    want = {"rows": n_rows, "classes": n_classes, "backbones": list(backbones), "seed": seed}
    paths = None
    if not (marker.exists() and json.loads(marker.read_text()) == want and all(f.exists() for f in files)):
        t0 = time.perf_counter()
        _, paths = write_feature_files(folder, n_rows=n_rows, n_classes=n_classes, backbones=backbones, seed=seed,
                                       data_root=images)
        marker.write_text(json.dumps(want))
        print(f"  wrote {len(files)} feature files of {n_rows} rows in {time.perf_counter() - t0:.0f} s", flush=True)
    if need_images and not (images / ".complete").exists():
        from featurepipe.store import load

        paths = load(files[0], features=False).paths if paths is None else paths
        link_images(images, paths, make_pool(home.parent / "pool"))
        (images / ".complete").touch()
    return files


def measure(args):
    out = Path(args.out).resolve()
    rows = []
    for n_rows in args.rows:
        home = out / f"{n_rows}"
        env = stage_env(home)
        table_stages = [s for s in STAGES if s in args.stages]
        files = []
        if set(table_stages) - {"predict"}:
            print(f"{n_rows} rows: preparing", flush=True)
            files = prepare(home, n_rows=n_rows, n_classes=args.classes, backbones=args.backbones, seed=args.seed,
                            need_images="report" in table_stages)
        cluster = (DaskCluster(args.dask_workers, args.dask_memory_gb, folder=home, env=env)
                   if args.dask_workers and "compare" in table_stages else None)
        try:
            rows += _measure_stages(table_stages, files, home, env, args, n_rows=n_rows, cluster=cluster)
        finally:
            if cluster:
                cluster.close()
    table = markdown(rows, args)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"scale-{datetime.now():%Y%m%d-%H%M}.md"
    path.write_text(table)
    print(f"-> {path}")
    return 0


def _measure_stages(table_stages, files, home, env, args, *, n_rows, cluster):
    rows = []
    model = None
    out = Path(args.out).resolve()
    for stage in table_stages:
        if stage == "predict":
            model = predict_setup(out, env, timeout=args.timeout)
            link_images(home / "predict-images", [f"{k // 1000:04d}/{k:07d}.jpg" for k in range(n_rows)],
                        make_pool(out / "pool"))
        dask = cluster.address if cluster and stage == "compare" else None
        cmd = stage_command(stage, files, home, n_rows=n_rows, model=model, clf=args.clf, dask=dask)
        print(f"{n_rows} rows: {stage}: {' '.join(map(str, cmd))}", flush=True)
        result = run_stage(cmd, env=env, timeout=args.timeout, log=home / f"{stage}.log",
                           max_rss_gb=args.max_rss_gb, cluster=cluster.process if dask else None)
        result.update(rows=n_rows, classes=args.classes if stage != "predict" else 3, stage=stage,
                      note=_note(stage, home, result, dask_memory_gb=args.dask_memory_gb if dask else None))
        print(f"  {json.dumps(result)}", flush=True)
        rows.append(result)
    return rows


def _note(stage, home, result, *, dask_memory_gb=None):
    if stage == "report":
        pages = sorted((home / "models").glob("*/report.html"))
        if pages:
            return f"page {pages[0].stat().st_size / 1e6:.1f} MB"
    if stage == "predict" and (home / "predict.csv").exists():
        with open(home / "predict.csv") as fh:
            return f"{sum(1 for _ in fh) - 1} CSV rows"
    if stage == "audit":
        summary = sorted((home / "models").glob("*/audit/summary.json"))
        if summary:
            s = json.loads(summary[0].read_text())
            return (f"{s.get('duplicate_pairs')} pairs ({s.get('duplicate_search', '')}), "
                    f"{s.get('suspects')} suspects, {s.get('rows_rescored')} rows re-scored"
                    + (f"; {len(s['notes'])} notes (sampled/approximated)" if s.get("notes") else ""))
    if dask_memory_gb:
        return (f"Dask: largest worker {result['worker_rss_gb']} GB (limit {dask_memory_gb:g} GB)"
                + ("" if result["status"] == "ok" else f"; {result['last']}"))
    return "" if result["status"] == "ok" else result["last"]


def markdown(rows, args):
    load = os.getloadavg()[0]
    lines = [f"`python benchmarks/scale.py {' '.join(sys.argv[1:])}` — {os.cpu_count()} cores, "
             f"load average {load:.1f} at the end; backbones {', '.join(args.backbones)}",
             "",
             "| rows | classes | stage | status | wall s | peak RSS GB (largest process) | peak RSS GB (process tree, sampled) | note |",
             "|---:|---:|---|---|---:|---:|---:|---|"]
    for r in rows:
        note = r["note"].replace("|", "\\|")
        lines.append(f"| {r['rows']:,} | {r['classes']} | {r['stage']} | {r['status']} | {r['seconds']} | "
                     f"{r['peak_rss_gb']} | {r['tree_rss_gb']} | {note} |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--backbones", nargs="+", default=list(BACKBONE_DIMS), choices=list(BACKBONE_DIMS))
    p.add_argument("--stages", nargs="+", default=["compare", "audit", "report"], choices=STAGES)
    p.add_argument("--out", default="/tmp/featurepipe-scale")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per stage before it is killed")
    p.add_argument("--max-rss-gb", type=float, default=16.0,
                   help="kill a stage whose processes together hold more than this (default 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clf", nargs="+", default=[], help="compare: these classifiers (default: compare's defaults)")
    p.add_argument("--dask-workers", type=int, default=0,
                   help="compare on a LocalCluster of this many worker processes (one thread each)")
    p.add_argument("--dask-memory-gb", type=float, default=3.0, help="each Dask worker's memory limit")
    args = p.parse_args()
    if args.dask_memory_gb and not args.dask_workers:
        args.dask_memory_gb = None
    return measure(args)


if __name__ == "__main__":
    sys.exit(main())
