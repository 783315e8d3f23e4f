"""Fixtures: the tiny random-weight SD 1.x / SDXL pipelines (alignit_core.testing) as loaded models,
the embedded model, the reliability tests' concept files and reference, and the demo served as a
visitor finds it."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# Idle OpenMP threads sleep instead of spinning: with two generations (or processes) sharing two cores,
# spinning threads made one text encoding take 450 ms instead of 1.5 ms. Read when torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from alignit_core import load_concept  # noqa: E402
from alignit_core.testing import build_tiny_sd, build_tiny_sdxl  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_sd():
    from alignit_core.models import from_components

    return from_components(build_tiny_sd(), "tiny-sd")


@pytest.fixture(scope="session")
def clip(tiny_sd):
    """A model whose prompts read as SD 1.5's (CLIP BPE, 77 positions): what the demo's token view
    needs of a model (its tokenizer and its family's prompt planning)."""
    return tiny_sd


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


def assert_writes_only(records, row: int, positions: list[int]) -> None:
    """Every MMDiT KVRecord's swap changed the keys and values of batch `row` at the text `positions`
    (every one of them) and nothing else."""
    for r in records:
        rows = [r.text.start + q for q in positions]
        for before, after in ((r.key, r.swapped_key), (r.value, r.swapped_value)):
            changed = (before != after).any(-1).any(-1)  # (batch, tokens)
            assert changed[row, rows].all(), (r.block, r.step)
            changed[row, rows] = False
            assert not changed.any(), (r.block, r.step)


# ------------------------------------------------------------------------------ the reliability tests' fixtures
# (test_bad_input, test_untrusted_files, test_failed_runs, test_many_generations, test_served_app)

@pytest.fixture(scope="module")
def one_thread_per_run():
    """One thread per run for a whole module (`pytestmark = pytest.mark.usefixtures(...)`): the tiny
    model's thousands of small ops run 10-100x slower with an OpenMP team of two on a busy 2-core
    machine (each op waits for both threads); one thread per run keeps these tests fast, and two
    concurrent runs still use both cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def concepts(tiny_sd, tmp_path_factory) -> SimpleNamespace:
    """Concept folders for the tiny SD: textual inversion `<toy>` and Custom Diffusion `<new1>` (class
    word 'dog'), an SD 1.5-wide (768) embedding file `<wide>` and an SD 1.5 LoRA file; with the first
    two loaded."""
    from reliability import WIDTH

    root = tmp_path_factory.mktemp("concepts")
    g = torch.Generator().manual_seed(0)
    toy = root / "toy"
    toy.mkdir()
    save_file({"<toy>": torch.randn(1, WIDTH, generator=g)}, str(toy / "learned_embeds.safetensors"))
    (toy / "manifest.json").write_text(json.dumps({"token": "<toy>", "class_word": "dog", "kind": "textual_inversion",
                                                   "weights": "learned_embeds.safetensors"}))
    cd = root / "cd"
    cd.mkdir()
    save_file({"<new1>": torch.randn(1, WIDTH, generator=g)}, str(cd / "learned_embeds.safetensors"))
    weights = {}
    for layer, attn in tiny_sd.cross_attention_layers.items():
        for w, name in ((attn.to_k.weight, "to_k"), (attn.to_v.weight, "to_v")):
            w = w.detach().cpu()
            weights[f"{layer}.processor.{name}_custom_diffusion.weight"] = w + 0.5 * torch.randn(w.shape, generator=g)
    save_file(weights, str(cd / "pytorch_custom_diffusion_weights.safetensors"))
    (cd / "manifest.json").write_text(json.dumps({
        "token": "<new1>", "class_word": "dog", "kind": "custom_diffusion", "weights": "learned_embeds.safetensors",
        "custom_diffusion": "pytorch_custom_diffusion_weights.safetensors"}))
    wide = root / "wide.safetensors"
    save_file({"<wide>": torch.randn(1, 768, generator=g)}, str(wide))
    lora = root / "sd15_lora.safetensors"  # a kohya LoRA whose layer takes SD 1.5's 768-wide text
    layer = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file({f"{layer}.lora_down.weight": torch.zeros(4, 768), f"{layer}.lora_up.weight": torch.zeros(16, 4)},
              str(lora))
    hostile = {name: root / f"{name}.safetensors" for name in ("long_token", "float8", "huge_norm", "empty")}
    vector = torch.randn(1, WIDTH, generator=g)
    save_file({"<" + "x" * 99_998 + ">": vector}, str(hostile["long_token"]))
    save_file({"<f8>": vector.to(torch.float8_e4m3fn)}, str(hostile["float8"]))
    save_file({"<huge>": vector / vector.norm() * 1e38}, str(hostile["huge_norm"]))  # finite in float32
    header = json.dumps({f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
                         for i in range(2_000)}, separators=(",", ":")).encode()  # under the upload limit, all header
    hostile["empty"].write_bytes(len(header).to_bytes(8, "little") + header)
    hostile["lora_huge"] = root / "lora_huge.safetensors"  # a LoRA update of norm 9e31 on a (16, 32) layer
    layer = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file({f"{layer}.lora_down.weight": torch.ones(4, WIDTH), f"{layer}.lora_up.weight": torch.full((16, 4), 1e30)},
              str(hostile["lora_huge"]))
    return SimpleNamespace(toy_dir=toy, cd_dir=cd, wide=wide, lora=lora, toy=load_concept(toy, tiny_sd),
                           cd=load_concept(cd, tiny_sd), **hostile)


@pytest.fixture(scope="module")
def reference(tiny_sd) -> tuple:
    """The model's fingerprint and the good request's pixels before any bad request."""
    from reliability import fingerprint, good_pixels

    return fingerprint(tiny_sd), good_pixels(tiny_sd)


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
