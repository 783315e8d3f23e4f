"""The app in headless Chromium on the embedded model: `python app.py` in a subprocess, driven by playwright.

    HF_HUB_OFFLINE=1 python -m pytest tests/test_browser.py -q -s

Screenshots, each also under the test's tmp_path: /tmp/app_initial.png (the page as a first visitor
sees it), /tmp/app_screenshot.png (after a token swap), /tmp/app_error.png (the error toast) and
/tmp/app_alignit.png (after clicking a concept example), /tmp/app_long_scored.png (a long prompt,
generated and scored), /tmp/app_two_concepts.png (two concepts in one prompt).
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
PROMPT = "a red circle on a blue background"
START_TIMEOUT_S = 240
GENERATE_TIMEOUT_MS = 240_000

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is not installed")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    """`python app.py --model embedded` on a free port; its output goes to a log shown on failure."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("app") / "app.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "app.py", "--model", "embedded", "--host", "127.0.0.1",
                                 "--port", str(port)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"app.py exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if time.monotonic() > deadline:
                proc.terminate()
                pytest.fail(f"app.py did not answer within {START_TIMEOUT_S}s:\n{log_path.read_text()[-3000:]}")
            time.sleep(1)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture
def page(app_url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(app_url)
        page.wait_for_selector("#prompt textarea", timeout=60_000)
        yield page
        browser.close()


def _screenshot(page, tmp_path: Path, name: str) -> Path:
    page.locator("#command").scroll_into_view_if_needed()  # below-the-fold images load before the shot
    page.wait_for_timeout(500)
    shot = tmp_path / name
    page.screenshot(path=str(shot), full_page=True)
    shutil.copy(shot, Path("/tmp") / name)
    return shot


def _image_bytes(page, selector: str) -> bytes:
    src = page.locator(f"{selector} img").first.get_attribute("src")
    response = page.request.get(src if src.startswith("http") else page.url.rstrip("/") + "/" + src.lstrip("/"))
    assert response.ok, f"{src}: HTTP {response.status}"
    return response.body()


def test_first_visit_shows_alignit_mode_with_the_concept_position_preselected(page, tmp_path):
    expect = _expect()
    expect(page.locator("#header")).to_contain_text("embedded-shapes")
    expect(page.locator("#header a[href='https://arxiv.org/abs/2406.18893']")).to_be_visible()
    expect(page.locator("#mode input[value='AlignIT (customized concept)']")).to_be_checked()
    prompt = page.locator("#prompt textarea").input_value()
    assert "<holed-star>" in prompt
    # p replaces the concept by its class word; the class word's position is pre-selected
    star = page.locator("#positions label", has_text="2: star")
    expect(star.locator("input")).to_be_checked(timeout=30_000)
    expect(page.locator("#prompt-texts")).to_contain_text("a star on a white background")
    expect(page.locator("#prompt-texts")).to_contain_text("<holed-star> star * * * *")
    expect(page.locator("#tokens")).to_contain_text("background")
    _screenshot(page, tmp_path, "app_initial.png")


def test_token_swap_red_to_yellow_then_a_bad_swap_shows_the_engine_error(page, tmp_path):
    expect = _expect()
    page.locator("#mode label", has_text="Token swap").click()
    expect(page.locator("#swaps textarea")).to_be_visible()
    # the concept prompt does not fit token swaps: a swap example takes its place; start afresh
    expect(page.locator("#swaps textarea")).not_to_have_value("", timeout=30_000)
    page.locator("#swaps textarea").fill("")
    page.locator("#prompt textarea").fill(PROMPT)
    red = page.locator("#positions label", has_text="2: red")
    expect(red).to_be_visible(timeout=30_000)
    red.click()  # ticking a position writes a `2=` template into the swaps box
    expect(page.locator("#swaps textarea")).to_have_value("2=", timeout=30_000)
    page.locator("#swaps textarea").fill("red=yellow")
    expect(red.locator("input")).to_be_checked(timeout=30_000)
    expect(page.locator("#prompt-texts")).to_contain_text("* yellow * * * * *")

    page.locator("#generate").click()
    expect(page.locator("#generate")).to_be_disabled()
    # the progress bar counts denoising steps
    expect(page.locator("#image-0")).to_contain_text(re.compile(r"\d+/20 steps"), timeout=GENERATE_TIMEOUT_MS)
    _screenshot(page, tmp_path, "app_progress.png")
    for i in (0, 1):
        expect(page.locator(f"#image-{i} img")).to_be_visible(timeout=GENERATE_TIMEOUT_MS)
        expect(page.locator(f"#heatmap-{i} img")).to_be_visible(timeout=GENERATE_TIMEOUT_MS)
    expect(page.locator("#generate")).to_be_enabled(timeout=30_000)
    baseline, swapped = _image_bytes(page, "#image-0"), _image_bytes(page, "#image-1")
    assert baseline[:8] == swapped[:8] == b"\x89PNG\r\n\x1a\n"
    assert baseline != swapped, "swapping red for yellow left the image unchanged"
    heatmaps = [_image_bytes(page, f"#heatmap-{i}") for i in (0, 1)]
    assert all(len(h) > 1000 for h in heatmaps)
    command = re.compile(r"python -m alignit_core generate .*--swap red=yellow")
    expect(page.locator("#command textarea")).to_have_value(command)
    # raw maps are drawn again from the kept generation; the images stay as they are
    overlay_src = page.locator("#heatmap-1 img").get_attribute("src")
    page.locator("#map-mode label", has_text="raw").click()
    expect(page.locator("#heatmap-1 img")).not_to_have_attribute("src", overlay_src)
    assert _image_bytes(page, "#heatmap-1") != heatmaps[1] and _image_bytes(page, "#image-1") == swapped
    page.locator("#map-mode label", has_text="overlay").click()
    _screenshot(page, tmp_path, "app_screenshot.png")

    # a word that is not in the prompt: the engine's message as a toast, the images stay
    page.locator("#swaps textarea").fill("cat=zebra")
    page.locator("#generate").click()
    toast = page.get_by_test_id("toast-body")
    expect(toast).to_contain_text("the word 'cat' is not in the prompt", timeout=60_000)
    expect(page.locator("#generate")).to_be_enabled(timeout=30_000)
    assert _image_bytes(page, "#image-1") == swapped
    page.wait_for_timeout(1000)  # let the toast finish sliding in
    _screenshot(page, tmp_path, "app_error.png")


LONG = PROMPT + ". " + " ".join(f"The frame number {i} is plain and quiet, with thin lines at the edge."
                                for i in range(5))


def test_a_long_prompt_is_read_in_segments_generated_and_scored(page, tmp_path):
    expect = _expect()
    page.locator("#mode label", has_text="Token swap").click()
    expect(page.locator("#swaps textarea")).not_to_have_value("", timeout=30_000)
    page.locator("#prompt textarea").fill(LONG)
    page.locator("#swaps textarea").fill("red=yellow")
    expect(page.locator("#prompt-texts")).to_contain_text("2 segments", timeout=30_000)
    expect(page.locator("#positions label", has_text="2: red").locator("input")).to_be_checked(timeout=30_000)
    # each segment keeps its start token, numbered among the others; it is not offered for swapping
    starts = [int(n) for n in re.findall(r"(\d+) · <\|startoftext\|>", page.locator("#chips").inner_text())]
    assert len(starts) == 2 and starts[0] == 0 and starts[1] > 10  # (the token before it is a full stop)
    second = starts[1]
    expect(page.locator("#positions label", has_text=f"{second - 1}: ")).to_have_count(1)
    expect(page.locator("#positions label", has_text=f"{second}: ")).to_have_count(0)
    page.locator("#generate").click()
    expect(page.locator("#generate")).to_be_disabled()
    expect(page.locator("#generate")).to_be_enabled(timeout=GENERATE_TIMEOUT_MS)
    page.locator("#image-0").scroll_into_view_if_needed()  # far below the long list of positions
    for i in (0, 1):
        expect(page.locator(f"#image-{i} img")).to_be_visible(timeout=30_000)
        # a tall heat-map row (one tile per token) loads lazily: check it arrived
        expect(page.locator(f"#heatmap-{i} img")).to_have_attribute("src", re.compile(r"\.png"), timeout=30_000)
    assert _image_bytes(page, "#image-0") != _image_bytes(page, "#image-1")
    assert len(_image_bytes(page, "#heatmap-1")) > 10_000
    page.locator("#score").click()
    expect(page.locator("#scores")).to_contain_text("MI score", timeout=GENERATE_TIMEOUT_MS)
    expect(page.locator("#scores")).to_contain_text("CLIP is not available")
    expect(page.locator("#mi-1 img")).to_have_attribute("src", re.compile(r"\.png"), timeout=30_000)
    _screenshot(page, tmp_path, "app_long_scored.png")


def test_clicking_a_concept_example_runs_alignit(page, tmp_path):
    expect = _expect()
    page.get_by_role("button", name="AlignIT · <striped-ball> · textual inversion").click()
    expect(page.locator("#prompt textarea")).to_have_value("a <striped-ball> on a green background")
    expect(page.locator("#positions label", has_text="2: circle").locator("input")).to_be_checked(timeout=30_000)
    for i in (0, 1):
        expect(page.locator(f"#image-{i} img")).to_be_visible(timeout=GENERATE_TIMEOUT_MS)
        expect(page.locator(f"#heatmap-{i} img")).to_be_visible(timeout=GENERATE_TIMEOUT_MS)
    expect(page.locator("#image-0")).to_contain_text("customized baseline")
    expect(page.locator("#image-1")).to_contain_text("AlignIT")
    expect(page.locator("#command textarea")).to_have_value(re.compile(r"--concept striped-ball-ti --positions 2"))
    # the base model on p as a third column, from the same seed
    first = _image_bytes(page, "#image-0")
    page.locator("#include-base label").click()
    page.locator("#generate").click()
    expect(page.locator("#image-2 img")).to_be_visible(timeout=GENERATE_TIMEOUT_MS)
    expect(page.locator("#heatmap-2 img")).to_be_visible(timeout=GENERATE_TIMEOUT_MS)
    expect(page.locator("#image-2")).to_contain_text("base model on p")
    expect(page.locator("#generate")).to_be_enabled(timeout=30_000)
    assert _image_bytes(page, "#image-0") == first
    _screenshot(page, tmp_path, "app_alignit.png")


def test_an_uploaded_embedding_becomes_a_concept_of_this_session(page, tmp_path):
    import torch
    from safetensors.torch import save_file

    expect = _expect()
    path = tmp_path / "learned_embeds.safetensors"
    save_file({"<my-ball>": torch.randn(64)}, str(path))  # the embedded model's text encoder is 64 wide
    page.get_by_text("Upload a concept").click()
    page.locator("#upload input[type=file]").set_input_files(str(path))
    page.locator("#upload-class textarea").fill("circle")
    page.locator("#add-concept").click()
    expect(page.locator("#prompt textarea")).to_have_value("a photo of a <my-ball>", timeout=30_000)
    expect(page.locator("#concept input")).to_have_value(re.compile(r"<my-ball> \(uploaded\)"))
    expect(page.locator("#positions label", has_text="5: circle").locator("input")).to_be_checked(timeout=30_000)


def test_named_api_endpoints_answer_gradio_client(app_url):
    from gradio_client import Client

    client = Client(app_url, verbose=False)
    table, *_ = client.predict("Token swap", None, PROMPT, "", api_name="/tokens")
    assert [row[3] for row in table["data"]][:4] == ["<|startoftext|>", "a", "red", "circle"]
    out = client.predict("Token swap", None, PROMPT, [], "circle=square", 3, 4, 5.0, 128, "ddim", False, 0.0, 1.0,
                         16, False, "overlay", api_name="/generate")
    baseline, swapped = out[0], out[1]
    assert Path(baseline).read_bytes() != Path(swapped).read_bytes()


def _expect():
    from playwright.sync_api import expect

    return expect


def test_a_visitor_picks_two_concepts_for_one_prompt(page, tmp_path):
    expect = _expect()
    page.get_by_role("button", name=re.compile("AlignIT · two concepts")).click()
    expect(page.locator("#prompt textarea")).to_have_value("a <holed-star> and a <striped-ball> on a white background")
    for label in ("2: star", "5: circle"):  # each concept's position, pre-selected
        expect(page.locator("#positions label", has_text=label).locator("input")).to_be_checked(timeout=30_000)
    expect(page.locator("#prompt-texts")).to_contain_text("p′ of <holed-star>")
    expect(page.locator("#prompt-texts")).to_contain_text("p′ of <striped-ball>")
    expect(page.locator("#tokens")).to_contain_text("token of p′ (<striped-ball>)")
    for i in (0, 1):
        expect(page.locator(f"#image-{i} img")).to_be_visible(timeout=GENERATE_TIMEOUT_MS)
    expect(page.locator("#image-0")).to_contain_text("customized baseline")
    expect(page.locator("#command textarea")).to_have_value(
        re.compile(r"--concept holed-star-cd --concept striped-ball-ti --positions 2 5"))
    _screenshot(page, tmp_path, "app_two_concepts.png")
