"""Screenshot a featurepipe report in headless Chromium (Debian's chromium + chromedriver).

    python docs/screenshot.py models/flowers5/report.html docs/report.png

Opens the page offline, clicks the largest off-diagonal confusion cell, and stacks two views —
the best model with that cell's images, and the map with a hover — into one small PNG.
"""

import argparse
import io
import shutil
import sys
import tempfile
from pathlib import Path

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1280,900", "--hide-scrollbars")


def shoot(page, out, *, width=1000):
    from PIL import Image
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    with tempfile.TemporaryDirectory() as profile:
        for flag in FLAGS + (f"--user-data-dir={profile}",):
            options.add_argument(flag)
        driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"))
        try:
            driver.execute_cdp_cmd("Network.enable", {})
            driver.execute_cdp_cmd("Network.emulateNetworkConditions",
                                   {"offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1})
            driver.get(Path(page).resolve().as_uri())
            cells = [c for c in driver.find_elements(By.CSS_SELECTOR, "#confusion td.cell")
                     if c.get_attribute("data-t") != c.get_attribute("data-p")]
            max(cells, key=lambda c: int(c.text)).click()
            views = [_view(driver, "best")]
            circles = driver.find_elements(By.CSS_SELECTOR, "#map circle.miss") or \
                driver.find_elements(By.CSS_SELECTOR, "#map circle")
            driver.execute_script("document.getElementById('map-section').scrollIntoView()")
            ActionChains(driver).move_to_element(circles[len(circles) // 2]).perform()
            views.append(_view(driver, None))
        finally:
            driver.quit()
    shots = [Image.open(io.BytesIO(v)).convert("RGB") for v in views]
    sheet = Image.new("RGB", (shots[0].width, sum(s.height for s in shots)), "white")
    top = 0
    for s in shots:
        sheet.paste(s, (0, top))
        top += s.height
    sheet = sheet.resize((width, round(sheet.height * width / sheet.width)), Image.LANCZOS)
    sheet.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    return Path(out)


def _view(driver, section_id):
    if section_id:
        driver.execute_script(f"document.getElementById('{section_id}').scrollIntoView()")
    return driver.get_screenshot_as_png()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("page")
    p.add_argument("out")
    args = p.parse_args(argv)
    print(shoot(args.page, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
