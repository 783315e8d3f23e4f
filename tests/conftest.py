"""Fixtures: the tiny random-weight SD 1.x / SDXL pipelines (alignit_core.testing) as loaded models,
the embedded model, and the demo served as a visitor finds it."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# Idle OpenMP threads sleep instead of spinning: with two generations (or processes) sharing two cores,
# spinning threads made one text encoding take 450 ms instead of 1.5 ms. Read when torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402

from alignit_core.testing import build_tiny_sd, build_tiny_sdxl  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_sd():
    from alignit_core.models import from_components

    return from_components(build_tiny_sd(), "tiny-sd")


@pytest.fixture(scope="session")
def tiny_sdxl():
    from alignit_core.models import from_components

    return from_components(build_tiny_sdxl(), "tiny-sdxl")


@pytest.fixture(scope="session")
def embedded():
    from alignit_core import load_model

    return load_model("embedded", device="cpu")


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """The tiny SD pipeline saved as a diffusers folder, for the CLI."""
    d = tmp_path_factory.mktemp("tiny-sd")
    build_tiny_sd().save_pretrained(d)
    return d


def run_at_once(jobs: list) -> list:
    """Call every job in its own thread, all starting together; their results in order."""
    import threading

    results, barrier = [None] * len(jobs), threading.Barrier(len(jobs))

    def run(i):
        barrier.wait()
        results[i] = jobs[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


START_TIMEOUT_S = 240


@pytest.fixture(scope="session")
def served_app(tmp_path_factory):
    """`python app.py --model embedded` on a free port, as a visitor finds it: (url, log path); its
    output goes to the log, shown on failure. The hub is made unreachable (HF_ENDPOINT on a closed local port) instead of
    declared offline, so the app must find that out itself, once."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = tmp_path_factory.mktemp("app") / "app.log"
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(GRADIO_ANALYTICS_ENABLED="False", HF_ENDPOINT="http://127.0.0.1:9")
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
    yield url, log_path
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session")
def app_url(served_app):
    return served_app[0]
