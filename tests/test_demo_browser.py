"""tools/demo.py in a real browser: headless Chromium (the system's) driven by Selenium.

Loads the page, uploads an image, types labels, presses Segment, waits for the
overlay and saves a screenshot as a test artifact (in $LSEG_TEST_ARTIFACTS, else
the test's temporary folder). The browser resolves no host but 127.0.0.1, and the
test checks that the page asked for nothing elsewhere: the demo works offline.

Needs `chromium` and `chromium-driver` (Debian/Ubuntu packages; `.ci/run` installs
them); without them the test is skipped with the reason. LSEG_DEMO_CHECKPOINT=DIR
runs it on that checkpoint instead of a tiny random one (docs/demo.png was taken so,
with the built-in default's run and its first example scene).
"""
import json
import os
import shutil
import tempfile
import time
from urllib.parse import urlparse

import numpy as np
from PIL import Image
import pytest

pytestmark = pytest.mark.slow

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
DRIVERS = ("chromedriver", "chromium.chromedriver")
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1400,1100",
    # Every host but this machine is unknown: the page must work offline.
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
)


def find_browser():
  """(browser, driver) paths, or skip with the reason."""
  webdriver = pytest.importorskip("selenium.webdriver",
                                  reason="selenium is not installed (pip install -e '.[test]')")
  pytest.importorskip("gradio", reason="the demo extra is not installed")
  browser = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
  driver = next((shutil.which(d) for d in DRIVERS if shutil.which(d)), None)
  if not browser or not driver:
    pytest.skip(f"no headless browser: {'chromium' if not browser else 'chromedriver'} not "
                "found on PATH (install with `apt-get install chromium chromium-driver`)")
  return webdriver, browser, driver


@pytest.fixture
def artifacts(tmp_path):
  folder = os.environ.get("LSEG_TEST_ARTIFACTS") or str(tmp_path)
  os.makedirs(folder, exist_ok=True)
  return folder


def test_page_segments_an_uploaded_image(tmp_path, artifacts):
  webdriver, browser, driver_path = find_browser()
  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.chrome.service import Service
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support import expected_conditions as ec
  from selenium.webdriver.support.ui import WebDriverWait
  from lseg_jax.cli import demo
  import test_demo
  # pylint: enable=g-import-not-at-top

  ckpt = os.environ.get("LSEG_DEMO_CHECKPOINT")
  if ckpt:
    labels = demo.EXAMPLE_SCENES[0][3]
  else:
    ckpt = str(tmp_path / "ckpt")
    test_demo.save_tiny_checkpoint(ckpt)
    labels = "dog, grass, other"
  args = demo.parse_args(["--checkpoint", ckpt, "--port", str(test_demo.free_port())])
  app, backend = demo.launch(args, block=False)
  image_path = backend.write_examples()[0][0]
  h, w = np.asarray(Image.open(image_path)).shape[:2]

  options = webdriver.ChromeOptions()
  options.binary_location = browser
  for flag in CHROMIUM_FLAGS:
    options.add_argument(flag)
  profile = tempfile.mkdtemp(prefix="chromium-profile-")
  options.add_argument(f"--user-data-dir={profile}")
  options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
  driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
  try:
    start = time.perf_counter()
    driver.get(app.local_url)
    wait = WebDriverWait(driver, 120)
    upload = wait.until(ec.presence_of_element_located(
        (By.CSS_SELECTOR, "#image input[type=file]")))
    upload.send_keys(image_path)
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#image img")))
    box = driver.find_element(By.CSS_SELECTOR, "#labels textarea")
    box.clear()
    box.send_keys(labels)
    driver.find_element(By.CSS_SELECTOR, "#segment").click()
    overlay = wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, "#overlay img")))
    wait.until(lambda d: "Segmented" in d.find_element(By.CSS_SELECTOR, "#status").text)
    seconds = time.perf_counter() - start
    status = driver.find_element(By.CSS_SELECTOR, "#status").text
    assert f"{w}x{h} image into {len(labels.split(','))} labels" in status, status
    # Every label of the area table is on the page, in order.
    table_text = driver.find_element(By.CSS_SELECTOR, "#areas").text
    positions = [table_text.find(s.strip()) for s in labels.split(",")]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), table_text
    # The overlay shown is the image's width plus the legend.
    natural = driver.execute_script("return [arguments[0].naturalWidth, "
                                    "arguments[0].naturalHeight];", overlay)
    assert natural[0] > w and natural[1] >= h, natural
    driver.execute_script("window.scrollTo(0, 0);")
    shot = os.path.join(artifacts, "demo_browser.png")
    driver.save_screenshot(shot)
    print(f"page loaded, image uploaded and segmented in {seconds:.1f} s; screenshot {shot}")

    # Nothing was requested from anywhere but the demo's own server.
    hosts = set()
    for entry in driver.get_log("performance"):
      message = json.loads(entry["message"])["message"]
      if message["method"] == "Network.requestWillBeSent":
        url = message["params"]["request"]["url"]
        if urlparse(url).scheme in ("http", "https", "ws", "wss"):
          hosts.add(urlparse(url).hostname)
    assert hosts == {"127.0.0.1"}, hosts
  finally:
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)
    app.close()
    backend.close()
