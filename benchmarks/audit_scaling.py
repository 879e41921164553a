"""Time the near-duplicate search: every pair (faiss flat index) vs faiss IVF, on synthetic features.

    python benchmarks/audit_scaling.py [--rows 20000 50000] [--dim 512] [--methods exact faiss]

Rows are clustered random vectors (like one class's photos) plus 1 % planted copies; prints, per
size and method, the seconds, the peak RSS growth and how many planted pairs were found.
Each measurement runs in a fresh process.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))


def child(n, dim, method):
    import numpy as np

    from featurepipe.audit import similar_pairs

    rng = np.random.default_rng(0)
    centers = rng.normal(0, 1, (20, dim)).astype(np.float32)
    X = centers[rng.integers(0, 20, n)] + rng.normal(0, 1.5, (n, dim)).astype(np.float32)
    n_copies = n // 100
    src = rng.choice(n - n_copies, n_copies, replace=False)
    X[n - n_copies:] = X[src] + rng.normal(0, 0.05, (n_copies, dim)).astype(np.float32)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    i, j, _ = similar_pairs(X, 0.9, exact_max_rows=n if method == "exact" else 0)
    seconds = time.perf_counter() - t0
    found = set(zip(i.tolist(), j.tolist()))
    planted = {(int(s), n - n_copies + k) for k, s in enumerate(src)}
    print(json.dumps({"rows": n, "method": method, "seconds": round(seconds, 1),
                      "rss_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024,
                      "planted_found": f"{len(planted & found)}/{len(planted)}", "pairs": len(found)}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, nargs="+", default=[20000, 50000])
    p.add_argument("--dim", type=int, default=512)  # the whitened space the audit searches
    p.add_argument("--methods", nargs="+", default=["exact", "faiss"], choices=["exact", "faiss"])
    p.add_argument("--child", nargs=3)
    args = p.parse_args()
    if args.child:
        n, dim, method = args.child
        return child(int(n), int(dim), method)
    print(f"load average {os.getloadavg()[0]:.2f}")
    for n in args.rows:
        for method in args.methods:
            subprocess.run([sys.executable, __file__, "--child", str(n), str(args.dim), method], check=True)
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    sys.exit(main())
