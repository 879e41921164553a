"""Time extraction without Dask and on a LocalCluster of 1 and 2 workers (docs/dask.md).

    FEATUREPIPE_WEIGHTS=../shared/weights python benchmarks/dask_scaling.py \
        --data ../shared/datasets/flowers5 --backbone squeezenet --out /tmp/dask_bench

Each run starts from an empty output folder. ``merge`` is the time of the final assembly from the
part files; ``start`` is the LocalCluster start-up (outside the extraction timer).
"""

import argparse
import resource
import shutil
import time
from pathlib import Path

import featurepipe.extract as extract_module
from featurepipe.distributed import session


def _cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _cluster_cpu(dask_client):
    return sum(dask_client.run(_cpu_seconds).values()) if dask_client is not None else 0.0


def timed_run(data, backbone, out, dask):
    timings = {"merge": 0.0}
    assemble = extract_module.assemble

    def timed_assemble(*args, **kwargs):
        t = time.perf_counter()
        try:
            return assemble(*args, **kwargs)
        finally:
            timings["merge"] += time.perf_counter() - t

    extract_module.assemble = timed_assemble
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    try:
        if dask is None:
            cpu0 = _cpu_seconds()
            [result] = extract_module.extract(data, [backbone], out=out, quiet=True)
            timings["start"], timings["cpu"] = 0.0, _cpu_seconds() - cpu0
        else:
            with session(dask) as dask_client:
                timings["start"] = time.perf_counter() - t0
                cpu0 = _cpu_seconds() + _cluster_cpu(dask_client)
                [result] = extract_module.extract(data, [backbone], out=out, quiet=True, dask=dask)
                timings["cpu"] = _cpu_seconds() + _cluster_cpu(dask_client) - cpu0
    finally:
        extract_module.assemble = assemble
    timings["total"] = time.perf_counter() - t0
    timings["extract"] = result.seconds
    timings["images"] = result.n_rows
    return timings


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--backbone", default="squeezenet")
    p.add_argument("--out", default="/tmp/dask_bench")
    p.add_argument("--runs", nargs="+", default=["none", "local:1", "local:2"])
    args = p.parse_args()
    print("| run | images | cluster start s | extract s | of which merge s | img/s (extract) | total s "
          "| CPU s | img per CPU s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run in args.runs:
        dask = None if run == "none" else run
        t = timed_run(args.data, args.backbone, Path(args.out) / run.replace(":", "_"), dask)
        print(f"| {run} | {t['images']} | {t['start']:.1f} | {t['extract']:.1f} | {t['merge']:.2f} "
              f"| {t['images'] / t['extract']:.1f} | {t['total']:.1f} | {t['cpu']:.0f} "
              f"| {t['images'] / t['cpu']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
