"""flashsd3-serve's page in a real headless browser (Debian's chromium + chromium-driver, driven by Selenium):
type a prompt, generate, see the image with its seed; upload an image, paint a mask, inpaint; a control image for
the demo ControlNet at scale 0.5. Skipped, saying
why, where the browser or Selenium is absent (.ci/run installs them). FLASHSD3_SERVE_SCREENSHOT=path.png saves
a screenshot of the page at the end (docs/serve-page.png was made so)."""
from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="flashsd3-serve's extra is not installed: pip install -e '.[test]'")
pytest.importorskip("uvicorn", reason="flashsd3-serve's extra is not installed: pip install -e '.[test]'")
pytest.importorskip("selenium", reason="selenium is not installed: pip install -e '.[test]'")
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if CHROMIUM is None or DRIVER is None:
    pytest.skip("no headless browser: apt-get install chromium chromium-driver (.ci/run does)", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from helpers_serve import ServerProcess, png_text  # noqa: E402

FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1280,1400")


@pytest.fixture(scope="module")
def page():
    server = ServerProcess("--max-pixels", 65536, "--controlnet", "demo")
    profile = tempfile.mkdtemp(prefix="flashsd3-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
    try:
        server.wait_ready()
        driver.get(server.url)
        WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#recipe option"))
        yield driver
    finally:
        driver.quit()
        server.stop()
        shutil.rmtree(profile, ignore_errors=True)


def typed(driver, element_id: str, text: str) -> None:
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(text)


def results(driver):
    return driver.find_elements(By.CSS_SELECTOR, "#gallery figure")


def generate_and_wait(driver):
    # one more figure than before: the tests share the page when they run in one process, and each one
    # also passes on its own (a worker of pytest-xdist may get any of them first)
    count = len(results(driver)) + 1
    driver.find_element(By.ID, "generate").click()
    WebDriverWait(driver, 60).until(lambda d: len(results(d)) == count or d.find_element(By.ID, "error").text)
    assert driver.find_element(By.ID, "error").text == ""
    newest = results(driver)[0]
    src = newest.find_element(By.TAG_NAME, "img").get_attribute("src")
    assert src.startswith("data:image/png;base64,")
    return newest, base64.b64decode(src.split(",", 1)[1])


def test_type_a_prompt_generate_and_see_the_image_with_its_seed(page):
    assert page.find_element(By.ID, "recipe").get_attribute("value") == "flash-sd3"
    assert page.find_element(By.ID, "steps").get_attribute("placeholder") == "4"
    assert not page.find_element(By.ID, "key-row").is_displayed()  # no key on loopback
    typed(page, "prompt", "a lighthouse at dusk")
    typed(page, "width", "64")
    typed(page, "height", "64")
    typed(page, "seed", "42")
    figure, png = generate_and_wait(page)
    assert figure.get_attribute("data-seed") == "42"
    assert "seed 42" in figure.text and "a lighthouse at dusk" in figure.text and "64x64" in figure.text
    meta = png_text(png)  # the download link's bytes: the server's PNG, metadata included
    assert (meta["prompt"], meta["seed"], meta["width"]) == ("a lighthouse at dusk", "42", "64")
    assert figure.find_element(By.CLASS_NAME, "download").get_attribute("href").startswith("data:image/png")
    assert page.find_element(By.ID, "progress-text").text.startswith("done: 1 image")
    page.find_element(By.ID, "randomize").click()
    assert page.find_element(By.ID, "seed").get_attribute("value") not in ("", "42")
    figure.find_element(By.CLASS_NAME, "reuse").click()  # click to reuse a seed
    assert page.find_element(By.ID, "seed").get_attribute("value") == "42"


def test_upload_an_image_paint_a_mask_and_inpaint(page, tmp_path):
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "photo.png")
    page.find_element(By.ID, "image-file").send_keys(str(tmp_path / "photo.png"))
    WebDriverWait(page, 10).until(lambda d: d.find_element(By.ID, "editor").is_displayed())
    canvas = page.find_element(By.ID, "mask-canvas")
    ActionChains(page).move_to_element_with_offset(canvas, -20, -20).click_and_hold().move_by_offset(30, 0) \
        .move_by_offset(0, 30).release().perform()
    assert page.find_element(By.ID, "edit-mode").text.startswith("inpainting")
    assert page.find_element(By.ID, "strength-value").text == "1.00"
    typed(page, "prompt", "a red door")
    typed(page, "seed", "7")
    figure, png = generate_and_wait(page)
    meta = png_text(png)
    assert (meta["prompt"], meta["seed"], meta["mask"], meta["strength"]) == ("a red door", "7", "mask", "1.0")
    assert figure.get_attribute("data-seed") == "7" and "strength 1" in figure.text


def test_a_control_image_with_a_controlnet_and_its_scale(page, tmp_path):
    if page.find_element(By.ID, "editor").is_displayed():
        page.find_element(By.ID, "remove-image").click()  # back to text to image
    edges = np.zeros((48, 80), np.uint8)
    edges[8:40, 30] = edges[8, 30:70] = 255
    Image.fromarray(edges).save(tmp_path / "edges.png")
    page.find_element(By.ID, "control-file").send_keys(str(tmp_path / "edges.png"))
    WebDriverWait(page, 10).until(lambda d: d.find_element(By.ID, "control-editor").is_displayed())
    assert page.find_element(By.ID, "width").get_attribute("value") == "80"  # the control image's size
    assert page.find_element(By.ID, "control-scale-value").text == "1.00"  # the --controlnet scale
    page.execute_script("const s = document.getElementById('control-scale'); s.value = 0.5; "
                        "s.dispatchEvent(new Event('input'))")
    typed(page, "prompt", "a fence")
    typed(page, "seed", "9")
    figure, png = generate_and_wait(page)
    meta = png_text(png)
    assert json.loads(meta["controlnet"]) == [{"source": "demo", "scale": 0.5, "control_image": "upload"}]
    assert (meta["width"], meta["height"]) == ("80", "48") and "ControlNet demo x0.5" in figure.text
    shot = os.environ.get("FLASHSD3_SERVE_SCREENSHOT")
    if shot:
        page.execute_script("window.scrollTo(0, 0)")
        page.save_screenshot(shot)
