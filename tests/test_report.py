"""The HTML report: what it contains (parsed from the page) and, in a real headless Chromium, that
it loads from file:// with the network off, sorts, opens confusion cells and draws the map."""

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from featurepipe.report import Limits, main, report
from featurepipe.store import FeatureFileWriter

from conftest import COLORS, make_image

CLASSES = ["blue", "green", "red"]
N_PER_CLASS = 12
CHROMIUM = Path(shutil.which("chromium") or "/usr/bin/chromium")
CHROMEDRIVER = Path(shutil.which("chromedriver") or "/usr/bin/chromedriver")


# --------------------------------------------------------------------------- tiny dataset


def build_dataset(root, *, unreadable=("green/img_011.png",)):
    """Images, one feature file (with planted mistakes and a skipped file) and its data root.

    Features are class centres plus noise; test image 0 of each class is given the features of
    the next class, so the fitted model gets exactly those wrong.
    """
    root = Path(root)
    images = root / "images" / "colors"
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 1, (len(CLASSES), 16)) * 4
    X, y, paths, split = [], [], [], []
    for c, name in enumerate(CLASSES):
        for i in range(N_PER_CLASS):
            rel = f"{name}/img_{i:03d}.png"
            if rel in unreadable:
                (images / rel).parent.mkdir(parents=True, exist_ok=True)
                (images / rel).write_bytes(b"not a png")
                continue
            make_image(images / rel, COLORS[name], size=(48, 40), seed=c * 100 + i)
            is_test = i % 3 == 0
            source = (c + 1) % len(CLASSES) if (is_test and i == 0) else c
            X.append(np.abs(centers[source] + rng.normal(0, 0.5, 16)))
            y.append(c)
            paths.append(rel)
            split.append("test" if is_test else "train")
    path = root / "features" / "colors" / "tiny.h5"
    path.parent.mkdir(parents=True, exist_ok=True)
    attrs = {"backbone": "tiny", "layer": "conv_b", "pooling": "avg", "image_size": 32, "resize": "stretch",
             "preprocess": "scale", "augment": "none", "weights_sha256": "ab" * 32, "engine": "tf",
             "featurepipe_version": "0.1.0", "tensorflow_version": "2.0", "keras_version": "3.0",
             "data_root": str(images), "feature_dim": 16, "n_rows": len(paths)}
    writer = FeatureFileWriter(path, n_rows=len(paths), dim=16, class_names=CLASSES, attrs=attrs)
    n = len(paths)
    writer.write_rows(np.arange(n), features=np.array(X, np.float32), labels=np.array(y), paths=paths,
                      split=split, file_size=np.zeros(n, np.int64), mtime_ns=np.zeros(n, np.int64),
                      sha1=["0" * 40] * n)
    writer.write_skipped([(u, "not an image (unidentified format)", 9, 0) for u in unreadable])
    writer.commit()
    return path


def fit_models(feature_file):
    from featurepipe.fit import fit

    return [fit([feature_file], clf, cv=2, n_jobs=1) for clf in ("logreg", "knn")]


def write_audit(folder):
    """Small audit outputs in the shape featurepipe.audit writes them."""
    audit = Path(folder) / "audit"
    audit.mkdir(parents=True, exist_ok=True)
    _csv(audit / "duplicates.csv", ["path_a", "path_b", "split_a", "split_b", "cosine"], [
        ["blue/img_001.png", "blue/img_002.png", "train", "train", "0.999"],
        ["red/img_004.png", "red/img_005.png", "train", "train", "0.990"],
        ["green/img_003.png", "green/img_001.png", "test", "train", "0.970"],
    ])
    _csv(audit / "suspects.csv", ["path", "split", "given", "suggested", "score"], [
        ["blue/img_000.png", "test", "blue", "green", "0.02"],
        ["red/img_007.png", "train", "red", "blue", "0.31"],
    ])
    _csv(audit / "learning_curve.csv",
         ["features", "clf", "n_per_class", "accuracy_mean", "accuracy_std", "n_seeds"],
         [["tiny", "logreg", n, acc, 0.05, 3] for n, acc in ((1, 0.5), (2, 0.7), (5, 0.85), (8, 0.9))])
    (audit / "summary.json").write_text(json.dumps({"duplicate_pairs": 3, "leaks": 1, "nested": {"x": 1}}))
    return audit


def _csv(path, header, rows):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def add_unfitted_rows(folder):
    """Rows without a model whose numbers sort differently as text (10.5 < 9.25), one value missing."""
    path = Path(folder) / "results.csv"
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for clf, seconds, accuracy in (("fake-a", "10.5", "0.2"), ("fake-b", "9.25", "0.3"), ("fake-c", "", "0.1"),
                                   ("fake-d", "100", "")):
        rows.append({**rows[0], "clf": clf, "fit_seconds": seconds, "test_accuracy": accuracy, "model": ""})
    _csv(path, list(rows[0]), [list(r.values()) for r in rows])


def page_data(html):
    """The JSON the page's script reads."""
    blob = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', html, re.S).group(1)
    return json.loads(blob)


@pytest.fixture
def dataset(tmp_path):
    feature_file = build_dataset(tmp_path)
    fit_models(feature_file)
    return feature_file, tmp_path / "home" / "models" / "colors"


# --------------------------------------------------------------------------- the page's content


def test_report_is_self_contained_and_holds_every_section(dataset):
    feature_file, folder = dataset
    write_audit(folder)
    result = report([feature_file])
    assert result.path == folder / "report.html" and result.size_bytes == result.path.stat().st_size
    html = result.path.read_text()
    # nothing the browser would fetch: every src/href is inline data or an anchor
    refs = re.findall(r'\b(?:src|href)\s*=\s*"([^"]*)"', html)
    assert refs and all(r.startswith(("data:", "#")) for r in refs), refs
    assert "url(http" not in html and "@import" not in html
    assert "default-src 'none'" in html
    # header: counts per class and split, the skipped file with its reason, provenance
    assert "not an image (unidentified format)" in html and "green/img_011.png" in html
    assert "ab" * 10 in html and "conv_b" in html
    data = page_data(html)
    best = result.best
    assert best.startswith("tiny / ")
    # the confusion cells hold exactly the test images of each (true, predicted) pair
    cells = data["cells"]
    assert sum(c["n"] for c in cells.values()) == 12  # 4 test images per class
    wrong = {item["path"] for key, c in cells.items() if key[0] != key[2] for item in c["items"]}
    assert {"blue/img_000.png", "green/img_000.png", "red/img_000.png"} <= wrong
    for c in cells.values():
        probs = [item["prob"] for item in c["items"]]
        assert probs == sorted(probs, reverse=True) and len(c["items"]) == c["n"]
    # thumbnails: only for images shown, each once, as small WebP
    referenced = set(re.findall(r'data-thumb="(\d+)"', html))
    referenced |= {i["t"] for c in cells.values() for i in c["items"]} | {p[5] for p in data["map"]["points"]}
    assert set(data["thumbs"]) == referenced
    assert all(uri.startswith("data:image/webp;base64,") for uri in data["thumbs"].values())
    assert result.n_thumbnails == len(data["thumbs"])
    # audit: the leak first, suspects with their suggestion, the learning curve as inline SVG
    dup_section = html[html.index('id="duplicates"'):]
    assert dup_section.index("green/img_003.png") < dup_section.index("blue/img_001.png")
    assert "3, of which 1 across splits" in html
    assert "suggested green" in html
    assert '<div class="curve" id="learning-curve"><svg' in html
    assert "duplicate pairs: <b>3</b>" in html and "nested" not in html
    assert "featurepipe.audit</code> makes" not in html


def test_report_without_audit_says_which_command_makes_it(dataset):
    feature_file, folder = dataset
    with open(folder / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    _csv(folder / "results.csv", list(rows[0]) + ["test_accuracy_no_leaks"],
         [list(r.values()) + [""] for r in rows])  # the column the audit fills, still empty
    html = report([feature_file]).path.read_text()
    assert html.count("<code>python -m featurepipe.audit</code> makes") == 3
    assert "test accuracy, no leaks" not in html


def test_results_table_shows_the_no_leak_column_when_present(dataset):
    feature_file, folder = dataset
    with open(folder / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        r["test_accuracy_no_leaks"] = "0.5"
    _csv(folder / "results.csv", list(rows[0]), [list(r.values()) for r in rows])
    html = report([feature_file]).path.read_text()
    assert "test accuracy, no leaks</th>" in html
    assert html.count('<td data-v="0.5" class="n">0.5000</td>') == len(rows)


def test_sections_are_bounded_and_count_what_they_leave_out(dataset):
    feature_file, folder = dataset
    write_audit(folder)
    limits = Limits(cell_images=1, mistakes=1, duplicate_pairs=1, suspects=1, map_points=6, skipped=0)
    result = report([feature_file], limits=limits)
    html = result.path.read_text()
    data = page_data(html)
    full = [c for c in data["cells"].values() if c["n"] > 1]
    assert full and all(len(c["items"]) == 1 for c in full)
    assert "2 more pairs not shown" in html and "1 more not shown" in html
    assert "3 wrong" in html and "1 of 3 (2 left out)" in html
    assert "1 more not listed" in html  # the skipped file
    assert len(data["map"]["points"]) == 6 and "29 left out" in html
    shown = {i["t"] for c in data["cells"].values() for i in c["items"]} | {p[5] for p in data["map"]["points"]}
    shown |= set(re.findall(r'data-thumb="(\d+)"', html))
    assert len(data["thumbs"]) == len(shown) < 35


def test_report_at_scale_levels_cells_drops_the_matrix_and_samples_the_map(dataset):
    """The bounds that keep the page small on 100k images, lowered to this tiny set."""
    from featurepipe.report import cell_allowance

    assert cell_allowance([50, 3, 0, 1], per_cell=200, total=10).tolist() == [6, 3, 0, 1]
    assert cell_allowance([50, 3], per_cell=2, total=1000).tolist() == [2, 2]
    assert cell_allowance([[5, 1], [2, 5]], per_cell=200, total=5).tolist() == [[2, 1], [1, 1]]
    feature_file, folder = dataset
    audit = write_audit(folder)
    (audit / "summary.json").write_text(json.dumps({"duplicate_pairs": 3, "notes": ["sampled <b>here</b>"]}))
    data = page_data(report([feature_file], limits=Limits(cell_total=4, map_points=5)).path.read_text())
    items = [len(c["items"]) for c in data["cells"].values()]
    assert sum(items) == 4 and sum(c["n"] for c in data["cells"].values()) > 4
    assert len(data["map"]["points"]) == 5 and data["map"]["n_test_shown"] == 5 < data["map"]["n_test"]
    html = report([feature_file], limits=Limits(matrix_classes=2)).path.read_text()
    assert page_data(html)["cells"] == {} and 'id="confusion"' not in html
    assert "No confusion matrix: 3 classes are more than the page draws (2)" in html
    assert "sampled &lt;b&gt;here&lt;/b&gt;" in html  # the audit's notes, escaped


def test_report_before_compare_and_with_missing_images(tmp_path):
    feature_file = build_dataset(tmp_path)
    shutil.rmtree(tmp_path / "images")
    result = report([feature_file])
    html = result.path.read_text()
    assert "No results yet: <code>python -m featurepipe.compare</code> makes them." in html
    assert "No fitted model to show" in html
    assert result.n_thumbnails == 0 and "images could not be read for a preview" in html
    assert len(page_data(html)["map"]["points"]) == 35


def test_cli_prints_the_path_and_bad_input_is_one_line(dataset, tmp_path, capsys):
    from featurepipe.cli import run_main

    feature_file, folder = dataset
    assert main(["--features", str(feature_file)]) == 0
    assert f"report: {folder / 'report.html'}" in capsys.readouterr().out
    assert run_main(main, ["--features", str(tmp_path / "nope.h5")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "feature file not found" in err


def test_compare_writes_the_report(tmp_path, capsys):
    from featurepipe.compare import main as compare_main

    feature_file = build_dataset(tmp_path)
    assert compare_main(["--features", str(feature_file), "--clf", "logreg", "--cv", "2", "--n-jobs", "1",
                         "--quiet"]) == 0
    page = tmp_path / "home" / "models" / "colors" / "report.html"
    assert capsys.readouterr().out.rstrip().endswith(f"report: {page}")
    assert "Best model: tiny / logreg" in page.read_text()


# --------------------------------------------------------------------------- in a real browser


def _browser_missing():
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        return (f"no {CHROMIUM} / {CHROMEDRIVER}: install Debian's chromium and chromium-driver "
                "(`make test` does when run as root with apt-get)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed: pip install -e '.[test]'"
    return None


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    missing = _browser_missing()
    if missing:
        print(f"\nbrowser tests skipped: {missing}")
        pytest.skip(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,1000",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.emulateNetworkConditions",
                           {"offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1})
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page(tmp_path_factory, browser):
    """The tiny dataset's report, opened from file:// in the offline browser."""
    root = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEATUREPIPE_MODELS", str(root / "models"))
        feature_file = build_dataset(root)
        fit_models(feature_file)
        add_unfitted_rows(root / "models" / "colors")
        write_audit(root / "models" / "colors")
        result = report([feature_file])
    browser.get_log("performance")  # drop the start-up entries
    browser.get(result.path.as_uri())
    return browser, page_data(result.path.read_text())


def test_browser_loads_offline_without_errors_or_requests(page):
    driver, data = page
    assert driver.execute_script("return document.readyState") == "complete"
    assert driver.title == "featurepipe report: colors"
    errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
    assert errors == []
    requested = [json.loads(e["message"])["message"]["params"]["request"]["url"]
                 for e in driver.get_log("performance") if '"Network.requestWillBeSent"' in e["message"]]
    assert requested and all(u.startswith(("file:", "data:")) for u in requested), requested
    broken = driver.execute_script(
        "return [...document.images].filter(i => i.src && !(i.complete && i.naturalWidth > 0)).length")
    shown = driver.execute_script("return document.querySelectorAll('img[src^=\"data:image/webp\"]').length")
    assert broken == 0 and shown >= 6  # mistakes, duplicate pairs and suspects


def _column(driver, key):
    index = driver.execute_script(
        "return [...document.querySelectorAll('#results-table th')].findIndex(th => th.dataset.key === arguments[0])",
        key)
    return driver.execute_script(
        "return [...document.querySelectorAll('#results-table tbody tr')].map(r => r.cells[arguments[0]].dataset.v)",
        index)


def test_browser_table_sorts_by_any_column(page):
    from selenium.webdriver.common.by import By

    driver, _ = page
    headers = driver.find_elements(By.CSS_SELECTOR, "#results-table th")
    columns = [(h.get_attribute("data-key"), h.get_attribute("data-type") == "num") for h in headers]
    assert len(columns) == 9 and ("fit_seconds", True) in columns and ("clf", False) in columns
    for key, as_number in columns:
        header = driver.find_element(By.CSS_SELECTOR, f'#results-table th[data-key="{key}"]')
        header.click()
        ascending = _column(driver, key)
        header.click()
        descending = _column(driver, key)
        convert = float if as_number else str
        values = [convert(v) for v in ascending if v != ""]
        n_missing = len(ascending) - len(values)
        assert ascending == [v for v in ascending if v != ""] + [""] * n_missing  # missing values last
        assert descending == [v for v in descending if v != ""] + [""] * n_missing
        assert values == sorted(values)
        if key in ("fit_seconds", "clf", "test_accuracy"):
            assert len(set(values)) > 2  # the order is not a coincidence
        assert [convert(v) for v in descending if v != ""] == sorted(values, reverse=True)
        assert header.get_attribute("aria-sort") == "descending"
    assert sorted(_column(driver, "clf")) == ["fake-a", "fake-b", "fake-c", "fake-d", "knn", "logreg"]


def test_browser_confusion_cell_shows_exactly_its_images(page):
    from selenium.webdriver.common.by import By

    driver, data = page
    cells = driver.find_elements(By.CSS_SELECTOR, "#confusion td.cell")
    assert len(cells) == len(CLASSES) ** 2
    for td in cells:
        td.click()
        count = int(td.text)
        cards = driver.find_elements(By.CSS_SELECTOR, "#cell-images .card")
        assert len(cards) == count
        loaded = driver.execute_script(
            "return [...document.querySelectorAll('#cell-images img')].filter(i => i.naturalWidth > 0).length")
        assert loaded == count
        expected = [i["path"] for i in data["cells"][f"{td.get_attribute('data-t')},{td.get_attribute('data-p')}"]["items"]]
        assert [c.text.split("\n")[0] for c in cards] == expected


def test_browser_map_draws_points_and_hover_shows_the_image(page):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    driver, data = page
    points = data["map"]["points"]
    circles = driver.find_elements(By.CSS_SELECTOR, "#map circle")
    assert len(circles) == len(points) == 35
    assert len(driver.find_elements(By.CSS_SELECTOR, "#map circle.miss")) == 3
    box = driver.execute_script("const b = document.getElementById('map').getBBox(); return [b.width, b.height]")
    assert min(box) > 300
    colours = {c.get_attribute("fill") for c in circles}
    assert len(colours) == len(CLASSES)
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", circles[0])
    ActionChains(driver).move_to_element(circles[-1]).perform()
    tip = driver.find_element(By.ID, "tip")
    assert tip.is_displayed()
    assert driver.execute_script("const i = document.querySelector('#tip img'); return i && i.naturalWidth") > 0
    assert tip.text.split("\n")[0] == points[int(circles[-1].get_attribute("data-i"))][6]


def test_second_report_reuses_the_map_and_predictions(dataset, monkeypatch):
    from sklearn.pipeline import Pipeline

    import featurepipe.report as reportmod

    feature_file, folder = dataset
    calls = []
    real_embed = reportmod.embed_2d
    monkeypatch.setattr(reportmod, "embed_2d", lambda X, **kw: calls.append("map") or real_embed(X, **kw))
    real_proba = Pipeline.predict_proba
    monkeypatch.setattr(Pipeline, "predict_proba", lambda self, X: calls.append("proba") or real_proba(self, X))
    first = page_data(report([feature_file]).path.read_text())
    second = page_data(report([feature_file]).path.read_text())
    assert calls == ["proba", "map"]
    assert second["map"] == first["map"] and second["cells"] == first["cells"]
    report([feature_file], seed=1)  # another sample and layout
    assert calls == ["proba", "map", "map"]
