"""The device page in a real browser (Debian's chromium through chromedriver): it shows the device and
its model, the live picture has real pixels with the face box drawn, the charts get points, and the
rollback button rolls back."""

from __future__ import annotations

import shutil

import pytest
from conftest import MODELS
from deploy_helpers import copy_model, ctl
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait
from test_web import get, start_web_agent

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

# The picture's pixels, read back through a canvas: how much they vary, and how many are the box's green.
PIXELS_JS = """
const img = document.getElementById('live');
if (!img.complete || !img.naturalWidth) return null;
const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
const ctx = c.getContext('2d'); ctx.drawImage(img, 0, 0);
const d = ctx.getImageData(0, 0, c.width, c.height).data;
let sum = 0, sq = 0, green = 0, n = d.length / 4;
for (let i = 0; i < d.length; i += 4) {
  const v = (d[i] + d[i + 1] + d[i + 2]) / 3; sum += v; sq += v * v;
  if (d[i + 1] > 180 && d[i] < 80 && d[i + 2] < 80) green++;
}
return {w: c.width, h: c.height, std: Math.sqrt(sq / n - (sum / n) ** 2), green: green};
"""


@pytest.fixture
def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def test_the_page_shows_the_device_live_picture_charts_and_rolls_back(broker, agent_factory, tmp_path,
                                                                      face_frames, browser):
    frames, _ = face_frames
    cfg, agent, base = start_web_agent(broker, agent_factory, tmp_path, frames, deploy={"probation_s": 0})
    v2 = copy_model(MODELS / "blazeface.tflite", tmp_path / "v2", "m.tflite")
    v2.write_bytes(v2.read_bytes() + b"2.0.0")  # after the flatbuffer: other bytes, the same model
    r = ctl(agent.config_path, "deploy", str(v2), "--version", "2.0.0", "--no-golden", "--timeout", "60")
    assert r.returncode == 0, r.stderr
    browser.get(base + "/")
    wait = WebDriverWait(browser, 30)
    wait.until(EC.text_to_be_present_in_element((By.ID, "device"), cfg["device_id"]))
    wait.until(EC.text_to_be_present_in_element((By.ID, "model"), "blazeface-short-range 2.0.0"))
    assert browser.find_element(By.ID, "state").text == "online"
    assert "tflite" in browser.find_element(By.ID, "backend").text
    pixels = wait.until(lambda d: d.execute_script(PIXELS_JS))
    assert (pixels["w"], pixels["h"]) == (640, 480)
    assert pixels["std"] > 20, "the picture is flat: no real frame"
    assert pixels["green"] > 100, "no face box drawn on the picture"
    wait.until(EC.text_to_be_present_in_element((By.ID, "results"), "face"))
    for chart in ("chart-fps", "chart-latency", "chart-cpu"):
        WebDriverWait(browser, 30).until(
            lambda d, c=chart: int(d.find_element(By.ID, c).get_attribute("data-points") or 0) >= 3)
    wait.until(EC.text_to_be_present_in_element((By.ID, "deployments"), "committed"))
    browser.find_element(By.ID, "rollback").click()
    wait.until(EC.alert_is_present()).accept()
    wait.until(EC.text_to_be_present_in_element((By.ID, "rollback-result"),
                                                "rolled back to blazeface-short-range 1.0.0"))
    wait.until(EC.text_to_be_present_in_element((By.ID, "model"), "blazeface-short-range 1.0.0"))
    wait.until(EC.text_to_be_present_in_element((By.ID, "deployments"), "rolled_back"))
    status = get(base + "/api/v1/status")
    assert b'"version": "1.0.0"' in status[2]
    console = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert console == [], console
