"""Plant known problems in a copy of a data set, extract features, audit, and score what was found.

    python benchmarks/audit_planted.py [--data ../shared/datasets/flowers5] [--work /tmp/audit_planted]
                                       [--move 0.05] [--copies 30] [--seed 0] [--stage build|extract|audit|all]

1. build: copies ``--data`` (class folders) into ``WORK/data/<name>``, moves ``--move`` of the
   images into another (random, wrong) class folder, and writes ``--copies`` altered copies of
   train images into new files of the same class: resized (60-90 %), slightly cropped (2-6 % off
   each side), or both, every second one mirrored, all re-compressed as JPEG (quality 60-90).
   ``WORK/planted.json`` lists what was planted.
2. extract: ``python -m featurepipe.extract`` with the three default backbones into
   ``WORK/features/<name>`` (run the script under ``flock`` when others share the machine).
3. audit: ``featurepipe.audit.audit`` on those files (outputs in ``WORK/models``), then scores it:
   the share of moved images among the top 2 x (number moved) suspects, the share of planted copies
   found as pairs, the share of reported pairs that are not copies (neither planted, nor
   byte-identical, nor one of the data set's own pairs judged "same scene" by eye in
   ``audit_planted_reviewed.csv``; a pair not in that file counts against), the cosine of every planted copy and of the nearest distinct image of the
   same class (to choose the threshold), and the audit's wall time. Prints one Markdown table and
   writes ``WORK/result.json``; exits 1 when a target is missed.
"""

import argparse
import csv
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))
DEFAULT_DATA = PROJECT.parent / "shared" / "datasets" / "flowers5"
DEFAULT_WEIGHTS = PROJECT.parent / "shared" / "weights"
BACKBONES = ("squeezenet", "mobilenet_v2", "efficientnet_lite0")
COPY_KINDS = ("resize", "crop", "resize+crop")


# --------------------------------------------------------------------------- build


def build(source, work, *, move_fraction, n_copies, seed):
    """The planted data set under ``work/data/<name>``; returns the plan written to planted.json."""
    from featurepipe.images import assign_split, list_images

    rng = random.Random(seed)
    dest = work / "data" / source.name
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(source, dest)
    index = list_images(dest)
    classes = index.class_names
    paths = list(index.paths)
    moved = []
    for rel in sorted(rng.sample(paths, round(move_fraction * len(paths)))):
        given = rel.split("/")[0]
        wrong = rng.choice([c for c in classes if c != given])
        new_rel = f"{wrong}/{Path(rel).name}"
        os.replace(dest / rel, dest / new_rel)
        moved.append({"path": new_rel, "given": wrong, "true": given})
    index = list_images(dest)
    split = assign_split(list(index.paths), index.labels, test_size=0.2, val_size=0.0, seed=0)
    moved_paths = {m["path"] for m in moved}
    train = [p for p, s in zip(index.paths, split) if s == "train" and p not in moved_paths]
    copies = [_plant_copy(dest, rel, i, rng) for i, rel in enumerate(sorted(rng.sample(train, n_copies)))]
    plan = {"data": str(dest), "source": str(source), "seed": seed, "moved": moved, "copies": copies}
    (work / "planted.json").write_text(json.dumps(plan, indent=1))
    return plan


def _plant_copy(root, rel, i, rng):
    from PIL import Image, ImageOps

    kind = COPY_KINDS[i % len(COPY_KINDS)]
    mirrored = i % 2 == 1
    with Image.open(root / rel) as im:
        im = im.convert("RGB")
        w, h = im.size
        if "crop" in kind:
            f = [rng.uniform(0.02, 0.06) for _ in range(4)]
            im = im.crop((round(f[0] * w), round(f[1] * h), w - round(f[2] * w), h - round(f[3] * h)))
        if "resize" in kind:
            s = rng.uniform(0.6, 0.9)
            im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.BICUBIC)
        if mirrored:
            im = ImageOps.mirror(im)
        quality = rng.randint(60, 90)
        copy_rel = f"{Path(rel).parent.as_posix()}/{Path(rel).stem}_c{i:02d}.jpg"
        im.save(root / copy_rel, format="JPEG", quality=quality)
    return {"copy": copy_rel, "source": rel, "kind": kind, "mirrored": mirrored, "quality": quality}


# --------------------------------------------------------------------------- extract


def extract(plan, work):
    out = work / "features" / Path(plan["data"]).name
    env = dict(os.environ, PYTHONPATH=str(PROJECT), FEATUREPIPE_DATA=str(work / "home"))
    env.setdefault("FEATUREPIPE_WEIGHTS", str(DEFAULT_WEIGHTS))
    cmd = [sys.executable, "-m", "featurepipe.extract", "--data", plan["data"], "--out", str(out), "--quiet"]
    cmd += [arg for b in BACKBONES for arg in ("--backbone", b)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)
    return [out / f"{b}.h5" for b in BACKBONES]


# --------------------------------------------------------------------------- audit and score


def run_audit(plan, files, work):
    from featurepipe.audit import audit

    os.environ["FEATUREPIPE_MODELS"] = str(work / "models")
    started = time.perf_counter()
    result = audit(features=files, quiet=True)
    return result, time.perf_counter() - started


def score(plan, result, seconds):
    """The numbers the done-when targets are about."""
    import numpy as np

    fs = result.feature_set
    moved = {m["path"] for m in plan["moved"]}
    top = [s.path for s in result.suspects[:2 * len(moved)]]
    copy_pairs = {frozenset((c["copy"], c["source"])) for c in plan["copies"]}
    found = {frozenset((d.path_a, d.path_b)) for d in result.duplicates}
    byte_identical = _byte_identical_pairs(plan, result)
    not_copies = [d for d in result.duplicates
                  if frozenset((d.path_a, d.path_b)) not in copy_pairs | byte_identical]
    reviewed = _reviewed()
    verdicts = [reviewed.get(frozenset((Path(d.path_a).name, Path(d.path_b).name)), "not reviewed")
                for d in not_copies]
    not_scene = sum(v != "same scene" for v in verdicts)
    sims, row = _similarities(fs)
    copy_cos = sorted(float(sims[row[a], row[b]]) for a, b in map(sorted, copy_pairs))
    return {
        "n_images": int(len(fs.paths)),
        "moved": len(moved),
        "moved_in_top_2x": sum(p in moved for p in top),
        "moved_recall_top_2x": sum(p in moved for p in top) / max(len(moved), 1),
        "suspects_listed": len(result.suspects),
        "suspects_flagged": result.n_flagged,
        "copies": len(copy_pairs),
        "copies_found": len(copy_pairs & found),
        "copies_recall": len(copy_pairs & found) / max(len(copy_pairs), 1),
        "copies_missed": sorted([sorted(p) for p in copy_pairs - found]),
        "pairs_reported": len(result.duplicates),
        "pairs_byte_identical": len(found & byte_identical),
        "pairs_natural": len(not_copies),
        "pairs_natural_by_verdict": {v: verdicts.count(v) for v in sorted(set(verdicts))},
        "pairs_not_copies": not_scene,
        "pairs_not_copies_share": not_scene / max(len(result.duplicates), 1),
        "not_copies": [[d.path_a, d.path_b, round(d.cosine, 4), v] for d, v in zip(not_copies, verdicts)],
        "threshold": result.threshold,
        "copy_cosines": [round(c, 4) for c in copy_cos],
        "by_threshold": _by_threshold(sims, row, fs, copy_pairs),
        "leaks": result.n_leaks,
        "audit_seconds": round(seconds, 1),
        "load_average": os.getloadavg(),
    }


def _similarities(fs):
    """Cosines of every pair in the space the audit searches (whitened features)."""
    from featurepipe.audit import whitened
    from featurepipe.fit import l2_normalize

    X = l2_normalize(whitened(fs.X)[0])
    return X @ X.T, {p: i for i, p in enumerate(fs.paths)}


def _by_threshold(sims, row, fs, copy_pairs, thresholds=(0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.9)):
    """Per threshold: planted copies found, other same-class / other-class pairs above it."""
    import numpy as np

    planted = {tuple(sorted((row[a], row[b]))) for a, b in map(tuple, copy_pairs)}
    i, j = np.nonzero(np.triu(sims >= min(thresholds), k=1))
    cos = sims[i, j]
    out = {}
    for t in thresholds:
        keep = cos >= t
        pairs = set(zip(i[keep].tolist(), j[keep].tolist()))
        other = pairs - planted
        same = sum(fs.y[a] == fs.y[b] for a, b in other)
        out[str(t)] = {"copies_found": len(pairs & planted), "other_same_class": int(same),
                       "other_cross_class": len(other) - int(same)}
    return out


def _reviewed():
    """Verdicts given by eye to the data set's own pairs (file names, any order):
    ``same scene`` (one photo edited, recoloured, re-cropped or resized, or two shots of one
    burst) or ``distinct``."""
    path = Path(__file__).with_name("audit_planted_reviewed.csv")
    with open(path, newline="") as fh:
        return {frozenset((r["file_a"], r["file_b"])): r["verdict"] for r in csv.DictReader(fh)}


def _byte_identical_pairs(plan, result):
    """Pairs of files with the same bytes (the data set's own exact duplicates)."""
    import hashlib

    root = Path(plan["data"])
    by_hash = {}
    for d in result.duplicates:
        for p in (d.path_a, d.path_b):
            by_hash.setdefault(p, hashlib.sha1((root / p).read_bytes()).hexdigest())
    return {frozenset((d.path_a, d.path_b)) for d in result.duplicates if by_hash[d.path_a] == by_hash[d.path_b]}


def table(s):
    rows = [
        ("images", s["n_images"]),
        ("moved images in the top 2 x moved suspects (target >= 90 %)",
         f"{s['moved_in_top_2x']} of {s['moved']} ({s['moved_recall_top_2x']:.1%})"),
        ("planted copies found as pairs (target >= 90 %)",
         f"{s['copies_found']} of {s['copies']} ({s['copies_recall']:.1%})"),
        ("reported pairs: planted copies / byte-identical / the data set's own, by eye",
         f"{s['copies_found']} / {s['pairs_byte_identical']} / {s['pairs_natural']} "
         f"({', '.join(f'{n} {v}' for v, n in s['pairs_natural_by_verdict'].items())})"),
        ("reported pairs that are not copies of one scene (distinct or not reviewed; target <= 5 %)",
         f"{s['pairs_not_copies']} of {s['pairs_reported']} ({s['pairs_not_copies_share']:.1%})"),
        ("threshold (cosine)", s["threshold"]),
        ("planted copies' cosine: min / 10 % / median", f"{s['copy_cosines'][0]} / "
         f"{s['copy_cosines'][len(s['copy_cosines']) // 10]} / {s['copy_cosines'][len(s['copy_cosines']) // 2]}"),
        ("suspects listed / flagged by cleanlab", f"{s['suspects_listed']} / {s['suspects_flagged']}"),
        ("test images with a near-duplicate in train/val", s["leaks"]),
        ("audit wall time, s", s["audit_seconds"]),
        ("load average", " ".join(f"{x:.2f}" for x in s["load_average"])),
    ]
    lines = ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    lines += ["", "| threshold | planted copies found (of {}) | other pairs, same class | other pairs, cross class |"
              .format(s["copies"]), "|---|---|---|---|"]
    lines += [f"| {t} | {v['copies_found']} | {v['other_same_class']} | {v['other_cross_class']} |"
              for t, v in s["by_threshold"].items()]
    return "\n".join(lines) + "\n"


def passed(s):
    return s["moved_recall_top_2x"] >= 0.9 and s["copies_recall"] >= 0.9 and s["pairs_not_copies_share"] <= 0.05


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--work", type=Path, default=Path("/tmp/audit_planted"))
    p.add_argument("--move", type=float, default=0.05)
    p.add_argument("--copies", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stage", choices=("build", "extract", "audit", "all"), default="all")
    args = p.parse_args(argv)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.stage in ("build", "all"):
        plan = build(args.data.resolve(), work, move_fraction=args.move, n_copies=args.copies, seed=args.seed)
        print(f"planted: {len(plan['moved'])} moved, {len(plan['copies'])} copies -> {plan['data']}")
    plan = json.loads((work / "planted.json").read_text())
    files = [work / "features" / Path(plan["data"]).name / f"{b}.h5" for b in BACKBONES]
    if args.stage in ("extract", "all"):
        files = extract(plan, work)
    if args.stage in ("audit", "all"):
        result, seconds = run_audit(plan, files, work)
        s = score(plan, result, seconds)
        (work / "result.json").write_text(json.dumps(s, indent=1))
        print(table(s), end="")
        print(f"details: {work / 'result.json'}; audit outputs: {result.folder}")
        return 0 if passed(s) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
