"""`convnet serve` in a real browser: headless Chromium driven through Selenium.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them) and the
``selenium`` package (the ``test`` extra). Without a browser these tests skip, saying why;
under CI (``CI`` set) they fail instead, since CI is meant to run them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import numpy as np
import pytest

import convnet.functional as F
import convnet.reference as R
import golden
from convnet import explain
from convnet.layers import AvgPool2d, Conv2d, MaxPool2d
from serving import running_server, small_model, small_trainer

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1300,1100"]


def _no_browser(reason: str):
    message = f"browser tests need headless Chromium: {reason} (apt-get install chromium chromium-driver; " \
              f"pip install selenium)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def find_browser() -> tuple[str, str]:
    """(chromium, chromedriver) paths, or skip."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        _no_browser("the selenium package is not installed")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        _no_browser(f"{'chromium' if chromium is None else 'chromedriver'} is not on PATH")
    return chromium, driver


@pytest.fixture(scope="module")
def browser():
    chromium, driver_path = find_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="convnet-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    try:
        driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    except Exception as exc:  # e.g. a driver that does not match the browser
        shutil.rmtree(profile, ignore_errors=True)
        _no_browser(f"Chromium did not start: {str(exc).splitlines()[0]}")
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def page(browser):
    """The page of a server for the small trained model, loaded and ready."""
    with running_server(small_model(), small_trainer()) as server:
        browser.get(server.url)
        wait(browser, "return document.body.dataset.ready === '1'")
        yield browser


def wait(driver, script: str, timeout: float = 30.0, *args):
    """Wait until the JavaScript expression ``script`` returns something truthy; return it."""
    end = time.monotonic() + timeout
    while True:
        value = driver.execute_script(script, *args)
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for: {script}")
        time.sleep(0.05)


# A 3 in the pad's 280x280 coordinates: top bow, middle, bottom bow.
THREE = [(95, 70), (125, 52), (165, 55), (188, 80), (180, 110), (150, 132), (128, 138), (160, 145), (190, 172),
         (192, 205), (168, 232), (130, 240), (95, 225)]


def draw(driver, points, pointer: str = "mouse") -> None:
    """Press, move through ``points`` and release, with real pointer events of a mouse or a finger."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.actions import interaction
    from selenium.webdriver.common.actions.pointer_input import PointerInput
    from selenium.webdriver.common.by import By

    pad = driver.find_element(By.ID, "pad")
    half_w, half_h = pad.size["width"] // 2, pad.size["height"] // 2
    kind = interaction.POINTER_MOUSE if pointer == "mouse" else interaction.POINTER_TOUCH
    actions = ActionChains(driver, duration=10, devices=[PointerInput(kind, pointer)])
    moves = actions.w3c_actions.pointer_action
    moves.move_to(pad, points[0][0] - half_w, points[0][1] - half_h).pointer_down()
    for x, y in points[1:]:
        moves.move_to(pad, x - half_w, y - half_h)
    moves.pointer_up()
    actions.perform()


def settled_prediction(driver) -> dict:
    """The prediction shown once the page has no request in flight: class, bars and the pixels sent."""
    time.sleep(0.3)  # past the debounce delay
    wait(driver, "return document.body.dataset.busy === '0' && document.getElementById('predicted').dataset.class")
    return driver.execute_script("""
        const out = document.getElementById('predicted');
        return {cls: Number(out.dataset.class), pixels: JSON.parse(out.dataset.pixels),
                probs: [...document.querySelectorAll('.bar')].map(b => Number(b.dataset.prob)),
                shown: out.textContent};""")


def test_drawn_digit_is_predicted_like_the_model_with_feature_maps(page):
    model = small_model()
    page.execute_script("document.getElementById('clear').click()")
    draw(page, THREE)
    got = settled_prediction(page)
    assert page.execute_script("return document.getElementById('pad').dataset.pointer") == "mouse"
    x = np.array(got["pixels"], dtype=np.float32).reshape(1, 1, 28, 28)
    assert 0 <= x.min() and x.max() == 1 and 40 < np.count_nonzero(x) < 400  # a stroke, not a blank or a blob
    logits = model.predict(x)[0]
    assert got["cls"] == int(np.argmax(logits)) and got["shown"] == str(got["cls"])
    np.testing.assert_allclose(got["probs"], F.softmax(logits.astype(np.float64)), rtol=1e-6, atol=1e-9)
    # Feature maps: one block per conv and pooling layer with one canvas per channel, painted.
    layers = [layer for layer in model.layers if isinstance(layer, (Conv2d, MaxPool2d, AvgPool2d))]
    blocks = page.execute_script("""
        return [...document.querySelectorAll('#maps .layer')].map(layer => ({
            name: layer.dataset.name,
            canvases: [...layer.querySelectorAll('canvas')].map(c => [c.width, c.height]),
            painted: [...layer.querySelectorAll('canvas')].some(c =>
                c.getContext('2d').getImageData(0, 0, c.width, c.height).data.some(v => v !== 0 && v !== 255))}));""")
    assert len(blocks) == len(layers) == 4
    for block, layer in zip(blocks, layers):
        assert block["name"].split(":")[1].strip().startswith(type(layer).__name__)
    h = x
    for layer in model.eval().layers:
        h = layer.forward(h)
        if isinstance(layer, (Conv2d, MaxPool2d, AvgPool2d)):
            block = blocks.pop(0)
            assert block["canvases"] == [[h.shape[3], h.shape[2]]] * h.shape[1] and block["painted"]
    saliency = page.execute_script("""
        const c = document.getElementById('saliency');
        const data = [...c.getContext('2d').getImageData(0, 0, c.width, c.height).data];
        return data.filter((v, i) => i % 4 !== 3 && v !== 255).length;""")
    assert saliency > 0


def test_clear_then_draw_again_sends_the_new_drawing(page):
    page.execute_script("document.getElementById('clear').click()")
    assert page.execute_script("return document.getElementById('predicted').dataset.class") is None
    draw(page, [(140, 50), (140, 235)])  # a 1
    got = settled_prediction(page)
    x = np.array(got["pixels"], dtype=np.float32).reshape(1, 1, 28, 28)
    assert got["cls"] == int(np.argmax(small_model().predict(x)[0]))
    columns = np.nonzero(x[0, 0].sum(axis=0))[0]
    assert columns.max() - columns.min() < 10  # a narrow upright stroke, centred
    assert 10 <= columns.mean() <= 17


def test_drawing_with_a_finger(page):
    page.execute_script("document.getElementById('clear').click()")
    draw(page, [(90, 60), (190, 60), (120, 240)], pointer="touch")  # a 7
    got = settled_prediction(page)
    assert page.execute_script("return document.getElementById('pad').dataset.pointer") == "touch"
    x = np.array(got["pixels"], dtype=np.float32).reshape(1, 1, 28, 28)
    assert np.count_nonzero(x) > 40
    assert got["cls"] == int(np.argmax(small_model().predict(x)[0]))


def table(driver, label: str) -> np.ndarray:
    cells = driver.execute_script(
        "const t = [...document.querySelectorAll('#step-body table.array')]"
        "  .find(t => t.dataset.label === arguments[0]);"
        "return t ? [...t.rows].map(r => [...r.cells].map(c => c.textContent)) : null;", label)
    assert cells is not None, f"no table {label!r} in this step"
    return np.array(cells, dtype=np.float64)


def open_step(driver, part: int, title_start: str) -> None:
    driver.execute_script("document.querySelector(`.part[data-part='${arguments[0]}']`).click()", part)
    index = driver.execute_script(
        "const items = [...document.querySelectorAll('#steps li')];"
        "const i = items.findIndex(li => li.textContent.startsWith(arguments[0]));"
        "if (i >= 0) items[i].click(); return i;",
        title_start)
    assert index >= 0, f"no step {title_start!r}"


def test_explain_view_shows_the_worked_examples(page):
    from selenium.webdriver.common.by import By

    page.find_element(By.ID, "tab-explain").click()
    wait(page, "return document.querySelectorAll('#steps li').length > 0")
    # Conv forward: the tutorial's feature maps.
    open_step(page, 0, "Feature maps")
    np.testing.assert_array_equal(table(page, "feature map 0"), golden.CONV_Y[0])
    np.testing.assert_array_equal(table(page, "feature map 1"), golden.CONV_Y[1])
    assert "engine == loop reference" in page.find_element(By.ID, "step-body").text
    # Backward: the sensitivity map and filter gradients, against the loop reference.
    dx, dw, _ = R.conv2d_backward(explain.EXAMPLE_DY[None], golden.CONV_X[None], golden.CONV_W,
                                  stride=golden.CONV_STRIDE, padding=golden.CONV_PADDING)
    open_step(page, 1, "4. Input sensitivity map")
    for c in range(3):
        np.testing.assert_allclose(table(page, f"input sensitivity map dx, channel {c}"), dx[0, c], atol=1e-4)
    open_step(page, 1, "5. Filter gradients")
    np.testing.assert_allclose(table(page, "dW1, channel 2"), dw[1, 2], atol=1e-4)
    # Pooling: max pooled maps, then the next step (button) routes the error.
    open_step(page, 2, "Max pooling forward")
    np.testing.assert_array_equal(table(page, "max pooled, channel 1"), golden.MAX_POOL_Y[1])
    page.find_element(By.ID, "next").click()
    title = page.find_element(By.ID, "step-title").text
    assert title.startswith("Pooling: 2x2 windows, stride 2: Max pooling backward")
    routed = [[0, 0, 0, 0], [0, 1, 0, 2], [3, 0, 0, 0], [0, 0, 0, 4]]
    np.testing.assert_array_equal(table(page, "dx, channel 0"), routed)
    # Clicking a cell marks that position in every table of the step.
    page.execute_script("document.querySelector('#step-body table.array').rows[1].cells[1].click()")
    marked = page.execute_script("return [...document.querySelectorAll('#step-body td.hl')].map(td => "
                                 "[td.parentElement.rowIndex, td.cellIndex])")
    assert marked and all(pos == [1, 1] for pos in marked)
    page.find_element(By.ID, "tab-draw").click()


def test_training_view_updates_the_curve_and_stops(page):
    from selenium.webdriver.common.by import By

    page.find_element(By.ID, "tab-train").click()
    epochs = page.find_element(By.ID, "epochs")
    epochs.clear()
    epochs.send_keys("1")
    page.find_element(By.ID, "start").click()
    wait(page, "return document.getElementById('train-status').dataset.status === 'done'", 60)
    assert page.execute_script("return document.getElementById('curve').dataset.points") == "1"
    assert len(page.find_elements(By.CSS_SELECTOR, "#filters canvas")) == 4  # the small network's 4 filters
    rows = page.find_elements(By.CSS_SELECTOR, "#history tr")
    assert len(rows) == 2 and rows[1].text.startswith("1 ")
    # A long run, stopped from the page after its first epoch.
    epochs.clear()
    epochs.send_keys("50")
    page.find_element(By.ID, "start").click()
    wait(page, "return Number(document.getElementById('curve').dataset.points) >= 1 && "
               "document.getElementById('train-status').dataset.status === 'running'", 60)
    assert page.find_element(By.ID, "start").get_attribute("disabled")
    page.find_element(By.ID, "stop").click()
    wait(page, "return document.getElementById('train-status').dataset.status === 'stopped'", 30)
    points = int(page.execute_script("return document.getElementById('curve').dataset.points"))
    assert 1 <= points < 50
    # The drawing view still answers after training.
    page.find_element(By.ID, "tab-draw").click()
    page.execute_script("document.getElementById('clear').click()")
    draw(page, THREE)
    got = settled_prediction(page)
    x = np.array(got["pixels"], dtype=np.float32).reshape(1, 1, 28, 28)
    assert got["cls"] == int(np.argmax(small_model().predict(x)[0]))

