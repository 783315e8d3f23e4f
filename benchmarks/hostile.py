"""Hostile visitors against the demo: each attack alone, then normal and hostile visitors at once on the served app.

    python benchmarks/hostile.py items                  # every attack in a fresh process: time, memory, outcome
    python benchmarks/hostile.py items --only fit-100000 float8 --timeout 60
    python benchmarks/hostile.py load                   # `python app.py` on loopback: 2 normal + 6 hostile visitors
    python benchmarks/hostile.py load --attacks ordinary    # the same visitors flooding ordinary requests
    python benchmarks/hostile.py load --hostile 0       # the normal visitors alone

`items` calls the app's own callbacks (`app.add_concept`, `app.generate`, `app.describe`) on the embedded
model, one attack per child process (the files are written before), and prints for each the seconds it
took, the peak and the lasting growth of resident memory (VmHWM and VmRSS against the process after a
warm-up generation) and what the visitor was told. A child past --timeout is killed and reported.

`load` starts the demo (`python app.py --model embedded`) on a free loopback port and, through
gradio_client (and plain HTTP for the upload form, as a browser sends it), measures:

* solo: a normal token-swap generation (20 steps, 128 px), the token table as a prompt is typed (one
  /tokens call per word) and a score, each alone (median of 3);
* the mixed run, 8 visitors, each its own session, all connected before the clock starts: --normal (2)
  normal visitors do --rounds rounds of typing, generating and scoring, while --hostile (6) hostile
  visitors, in a process of their own, send the attacks in turn, back to back, until the normal
  visitors are done; each normal request against its solo time (target <= 4x), each attack's outcome,
  and the server's resident memory before and after (target: back within 50 MB once it is idle).

Prints a table and the JSON (--json FILE saves it, with every request).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


NORMAL_PROMPT = "a red circle on a blue background"
LONG_PROMPT = " ".join([NORMAL_PROMPT] * 3100)[:100_000]  # 100,000 characters
MANY_SWAPS = "\n".join(["red=yellow"] * 20_000)


# ------------------------------------------------------------------------------ files an attacker uploads

WIDTH = 64  # the embedded model's text-encoder width


def _embedding(path: Path, key: str, vector) -> None:
    from safetensors.torch import save_file

    save_file({key: vector.contiguous()}, str(path))


def _empty_tensors(path: Path, count: int = 700_000) -> None:
    """A valid safetensors file of `count` empty float32 tensors (39 MB for 700,000): all header."""
    header = json.dumps({f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
                         for i in range(count)}, separators=(",", ":")).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header)


def write_uploads(folder: Path) -> dict[str, Path]:
    """Every hostile upload, written into `folder` (before any clock starts): name -> file."""
    import torch

    vector = 0.5 * torch.randn(1, WIDTH, generator=torch.Generator().manual_seed(0))
    files = {name: folder / f"{name}.safetensors" for name in UPLOADS}
    for name, chars in (("token-2000", 2_000), ("token-100000", 100_000)):
        _embedding(files[name], "<" + "x" * (chars - 2) + ">", vector)
    _empty_tensors(files["empty-tensors-700000"])
    _embedding(files["float8"], "<f8>", vector.to(torch.float8_e4m3fn))
    _embedding(files["norm-1e38"], "<huge>", vector / vector.norm() * 1e38)
    return files


UPLOADS = ("token-2000", "token-100000", "empty-tensors-700000", "float8", "norm-1e38")
ATTACKS = UPLOADS + ("truncate-100000", "tokens-20000-swaps", "tokens-100000-chars")
ORDINARY = "ordinary"  # the token table of a normal prompt: a flood of ordinary requests, for comparison


# ------------------------------------------------------------------------------ memory of a process

def memory_mib(pid: int | str = "self") -> dict[str, float]:
    """VmRSS and VmHWM (peak) of a process, MiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


# ------------------------------------------------------------------------------ items: each attack alone

def _generate(model, registry, uploaded=None, mode=None, concept_key=None, prompt=NORMAL_PROMPT,
              swaps="red=yellow", long_prompt="segments"):
    import app

    return app.generate(model, registry, uploaded or {}, mode or app.SWAP, concept_key, prompt, [], swaps, 0, 20,
                        10.0, 128, "ddim", False, 0.0, 1.0, None, False, "overlay", long_prompt,
                        progress=lambda *a, **k: None)


def _upload_then_generate(model, registry, path: Path) -> str:
    """The upload form (class word `circle`), then a generation with the concept if it was accepted."""
    import numpy as np
    from PIL import Image

    import app

    uploaded, _, _, prompt = app.add_concept(model, registry, {}, str(path), "", "circle")
    key = next(iter(uploaded))
    out = _generate(model, registry, uploaded, app.ALIGNIT, key, prompt.replace("a photo of", "a") + " on a green"
                    " background")
    with Image.open(out[1]) as shown:  # the AlignIT image's PNG
        image = np.asarray(shown.convert("L"), dtype=float)
    grid = Path(out[2 * app.MAX_COLUMNS])
    return f"generated (AlignIT image mean {image.mean():.1f} / 255; grid PNG {grid.stat().st_size / 2**20:.2f} MiB)"


# Each item: (model, registry, folder of write_uploads' files) -> what the visitor got.

def _fit(chars: int):
    def run(model, registry, folder):
        from visualize import text

        return f"fitted to {len(text.fit('x' * chars, text.font(13), 96))} characters"
    return run


def _upload(name: str):
    return lambda model, registry, folder: _upload_then_generate(model, registry, folder / f"{name}.safetensors")


def _load_concept(name: str):
    """A file given to `load_concept` as the CLI and the Python API do (their size limit is 1 GiB)."""
    def run(model, registry, folder):
        from alignit_core import load_concept

        return f"loaded {load_concept(folder / f'{name}.safetensors', model, class_word='circle').token}"
    return run


def _float8_cli(model, registry, folder) -> str:
    done = subprocess.run([sys.executable, "-m", "alignit_core", "generate", "--model", "embedded", "--device", "cpu",
                           "--concept", str(folder / "float8.safetensors"), "--class-word", "circle", "--prompt",
                           "a <f8> on a green background", "--steps", "2", "--out", str(folder / "out")],
                          capture_output=True, text=True, cwd=ROOT)
    return f"exit {done.returncode}: {(done.stderr.strip().splitlines() or [''])[-1][:200]}"


def _truncate(model, registry, folder) -> str:
    import app

    out = _generate(model, registry, prompt=LONG_PROMPT, swaps="2=yellow", long_prompt="truncate")
    return f"generated (grid PNG {Path(out[2 * app.MAX_COLUMNS]).stat().st_size / 2**20:.2f} MiB)"


def _describe(prompt: str, swaps: str):
    def run(model, registry, folder):
        import app

        table, _, _, texts, _ = app.describe(model, registry, {}, app.SWAP, None, prompt, swaps)
        return f"{len(table)} table rows; {texts.splitlines()[-1][:160] if texts else ''}"
    return run


ITEMS = {
    "fit-2000": _fit(2_000),
    "fit-100000": _fit(100_000),
    **{name: _upload(name) for name in UPLOADS},
    "empty-tensors-700000-api": _load_concept("empty-tensors-700000"),
    "float8-cli": _float8_cli,
    "truncate-100000": _truncate,
    "tokens-20000-swaps": _describe(NORMAL_PROMPT, MANY_SWAPS),
    "tokens-100000-chars": _describe(LONG_PROMPT, ""),
}


def run_item(name: str, folder: Path) -> dict:
    """In this process: the embedded model, one warm-up generation, then the attack, measured."""
    import app
    from alignit_core import AlignITError, find_concepts, load_model

    model = load_model("embedded", device="cpu")
    registry = {c.name: c for c in find_concepts(app.CONCEPTS_DIR, model)}
    _generate(model, registry)
    gc.collect()
    before = memory_mib()["VmRSS"]
    reset_peak()
    t0 = time.perf_counter()
    try:
        outcome = ITEMS[name](model, registry, folder)
    except Exception as e:  # what the visitor is told: a gr.Error's or the engine's message, or a crash
        refused = hasattr(e, "message") or isinstance(e, AlignITError)
        message = getattr(e, "message", None) or (str(e) if refused else f"{type(e).__name__}: {e}")
        outcome = ("refused: " if refused else "crashed: ") + str(message)[:300]
    seconds = time.perf_counter() - t0
    gc.collect()
    after = memory_mib()
    return {"item": name, "seconds": round(seconds, 4), "peak_mib": round(after["VmHWM"] - before, 1),
            "after_mib": round(after["VmRSS"] - before, 1), "outcome": outcome}


def items(names: list[str], timeout: float) -> list[dict]:
    print(f"machine load average {os.getloadavg()[0]:.1f}", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        write_uploads(Path(tmp))
        for name in names:
            try:
                done = subprocess.run([sys.executable, __file__, "_item", name, tmp], capture_output=True, text=True,
                                      timeout=timeout, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
                lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
                result = json.loads(lines[-1]) if lines else {"item": name, "outcome": done.stderr[-300:]}
            except subprocess.TimeoutExpired:
                result = {"item": name, "seconds": f"> {timeout:g}", "outcome": "killed at the timeout"}
            print(f"{result['item']:<22} {str(result.get('seconds', '')):>9} s  peak +{result.get('peak_mib', '?')} "
                  f"MiB  after +{result.get('after_mib', '?')} MiB  {result['outcome']}", flush=True)
            results.append(result)
    return results


# ------------------------------------------------------------------------------ load: the served app

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python app.py --model embedded` on a free loopback port."""

    def __init__(self):
        import httpx

        port = _free_port()
        self.url = f"http://127.0.0.1:{port}/"
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen([sys.executable, "app.py", "--model", "embedded", "--port", str(port)],
                                        cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "config", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        else:
            raise RuntimeError("the app did not start")
        config = httpx.get(self.url + "config").json()
        by_id = {c["id"]: c for c in config["components"]}
        self.add_fn = next(d for d in config["dependencies"]
                           if any(by_id.get(t[0], {}).get("props", {}).get("elem_id") == "add-concept"
                                  for t in d["targets"]))["id"]

    def rss(self) -> float:
        return memory_mib(self.process.pid)["VmRSS"]

    def settle(self, seconds: float = 5.0) -> float:
        """Resident memory once the server has been idle for `seconds`."""
        time.sleep(seconds)
        return self.rss()

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def generate_args(prompt=NORMAL_PROMPT, swaps="red=yellow", mode="Token swap", concept=None, long_prompt="segments",
                  seed=0) -> dict:
    return dict(mode=mode, concept_key=concept, prompt=prompt, positions=[], swaps=swaps, seed=seed, steps=20,
                guidance=10.0, size=128, scheduler="ddim", swap_uncond=False, swap_start=0.0, swap_end=1.0,
                map_resolution=16, include_base=False, map_mode="overlay", long_prompt=long_prompt)


class Visitor:
    """One browser tab: one gradio_client session on the app at `url`, whose upload form's `Add concept`
    is event `add_fn`."""

    def __init__(self, url: str, add_fn: int):
        from gradio_client import Client

        self.url, self.add_fn = url, add_fn
        self.client = Client(url, verbose=False)

    def generate(self, **kwargs):
        return self.client.predict(**generate_args(**kwargs), api_name="/generate")

    def tokens(self, prompt=NORMAL_PROMPT, swaps="red=yellow"):
        return self.client.predict(mode="Token swap", concept_key=None, prompt=prompt, swaps=swaps, long="segments",
                                   api_name="/tokens")

    def score(self):
        return self.client.predict(map_mode="overlay", api_name="/score")

    def upload_and_generate(self, path: Path):
        """The upload form as a browser sends it (the file, then `Add concept` in this session), then a
        generation with the concept if it was accepted."""
        import httpx

        url, session = self.url, self.client.session_hash
        with path.open("rb") as f:
            r = httpx.post(url + "gradio_api/upload", files={"files": (path.name, f)}, timeout=120)
        r.raise_for_status()
        file = {"path": r.json()[0], "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}
        body = {"data": [None, file, "", "circle", 1], "fn_index": self.add_fn, "session_hash": session,
                "event_data": None, "trigger_id": None}
        event = httpx.post(url + "gradio_api/queue/join", json=body, timeout=30).json()["event_id"]
        with httpx.stream("GET", url + "gradio_api/queue/data", params={"session_hash": session}, timeout=900) as s:
            for line in s.iter_lines():
                msg = json.loads(line[5:]) if line.startswith("data:") else {}
                if msg.get("msg") == "process_completed" and msg.get("event_id") == event:
                    break
            else:
                raise RuntimeError("the stream ended without a result")
        if not msg.get("success"):
            raise RuntimeError((msg.get("output") or {}).get("error") or "refused")
        key = next(o for o in msg["output"]["data"] if isinstance(o, dict) and "value" in o)["value"]
        return self.generate(mode="AlignIT (customized concept)", concept=key,
                             prompt=f"a {key.removeprefix('uploaded:')} on a green background")

    def close(self) -> None:
        self.client.close()


def attack(name: str, visitor: Visitor, files: dict[str, Path]):
    if name in files:
        return visitor.upload_and_generate(files[name])
    if name == "ordinary":
        return visitor.tokens()
    if name == "truncate-100000":
        return visitor.generate(prompt=LONG_PROMPT, swaps="2=yellow", long_prompt="truncate")
    if name == "tokens-20000-swaps":
        return visitor.tokens(swaps=MANY_SWAPS)
    if name == "tokens-100000-chars":
        return visitor.tokens(prompt=LONG_PROMPT, swaps="")
    raise ValueError(f"no attack named {name!r}")


def timed(fn) -> tuple[float, str]:
    """(seconds, 'ok' or the error the visitor got)."""
    t0 = time.perf_counter()
    try:
        fn()
        outcome = "ok"
    except Exception as e:  # the app's refusal reaches the client as an AppError
        outcome = f"{type(e).__name__}: {str(e)[:120]}"
    return time.perf_counter() - t0, outcome


def typing(visitor: Visitor) -> None:
    """The token table as a prompt is typed: one /tokens call per word."""
    words = NORMAL_PROMPT.split()
    for n in range(1, len(words) + 1):
        visitor.tokens(prompt=" ".join(words[:n]))


def timed_log(log: list, lock: threading.Lock, kind: str, name: str, fn, solo: dict | None = None) -> None:
    """Run `fn` and append how long it took and what it returned (against `solo[name]`, when given)."""
    seconds, outcome = timed(fn)
    with lock:
        log.append({"kind": kind, "name": name, "seconds": round(seconds, 3), "outcome": outcome,
                    "ratio": round(seconds / solo[name], 2) if solo else None})


def run_together(visitors: list[Visitor], work) -> None:
    """`work(v, visitor)` for every visitor at once, one thread each."""
    threads = [threading.Thread(target=work, args=(v, visitor)) for v, visitor in enumerate(visitors)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for visitor in visitors:
        visitor.close()


def hostile_process(url: str, add_fn: int, folder: str, attacks: list, count: int, ready, go, stop, out) -> None:
    """The hostile visitors, in a process of their own (their uploads and floods load the server, not
    the process that times the normal visitors): each sends the attacks in turn, back to back, from `go`
    until `stop`. Puts their log on `out`."""
    files = {name: Path(folder) / f"{name}.safetensors" for name in UPLOADS}
    visitors = [Visitor(url, add_fn) for _ in range(count)]
    log, lock = [], threading.Lock()

    def work(v: int, visitor: Visitor) -> None:
        k = v
        while not stop.is_set():
            name = attacks[k % len(attacks)]
            timed_log(log, lock, "hostile", name, lambda: attack(name, visitor, files))
            k += 1

    ready.set()
    go.wait()
    run_together(visitors, work)
    out.put(log)


def load(rounds: int, attacks, normal: int, hostile: int) -> dict:
    import multiprocessing

    server = Server()
    results: dict = {"normal_clients": normal, "hostile_clients": hostile, "rounds": rounds, "attacks": list(attacks),
                      "load_average_before": os.getloadavg()}
    log: list[dict] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            write_uploads(Path(tmp))
            alone = Visitor(server.url, server.add_fn)
            for i in range(2):  # warm-up: the first requests load lazily
                alone.generate(seed=i)
                typing(alone)
            solo = {"generate": [], "typing": [], "score": []}
            for i in range(3):
                solo["generate"].append(timed(lambda: alone.generate(seed=i))[0])
                solo["typing"].append(timed(lambda: typing(alone))[0])
                solo["score"].append(timed(alone.score)[0])
            alone.close()
            solo = {k: statistics.median(v) for k, v in solo.items()}
            results["solo_s"] = {k: round(v, 3) for k, v in solo.items()}
            print(f"solo: {results['solo_s']}", flush=True)
            results["rss_start_mib"] = round(server.settle(), 1)

            # every visitor connects first (a client's first call fetches the app's API), then all start at once
            context = multiprocessing.get_context("spawn")
            ready, go, stop, out = context.Event(), context.Event(), context.Event(), context.Queue()
            attackers = context.Process(target=hostile_process, args=(server.url, server.add_fn, tmp, list(attacks),
                                                                      hostile, ready, go, stop, out))
            attackers.start()
            visitors = [Visitor(server.url, server.add_fn) for _ in range(normal)]
            ready.wait(300)
            lock = threading.Lock()

            def work(v: int, visitor: Visitor) -> None:
                for r in range(rounds):
                    timed_log(log, lock, "normal", "typing", lambda: typing(visitor), solo)
                    timed_log(log, lock, "normal", "generate", lambda: visitor.generate(seed=10 * v + r), solo)
                    timed_log(log, lock, "normal", "score", visitor.score, solo)

            peak = [results["rss_start_mib"]]
            done = threading.Event()

            def watch() -> None:
                while not done.wait(0.5):
                    peak[0] = max(peak[0], server.rss())

            watcher = threading.Thread(target=watch)
            watcher.start()
            t0 = time.perf_counter()
            go.set()
            run_together(visitors, work)
            stop.set()
            log += out.get(timeout=3600)
            attackers.join()
            results["load_s"] = round(time.perf_counter() - t0, 1)
            done.set()
            watcher.join()
            results["rss_peak_mib"] = round(peak[0], 1)
            results["rss_end_mib"] = round(server.settle(10), 1)
            results["load_average_after"] = os.getloadavg()
    finally:
        server.close()
    results["requests"] = log
    results["normal_vs_solo"] = {}
    for name in solo:
        ratios = [e["ratio"] for e in log if e["kind"] == "normal" and e["name"] == name]
        results["normal_vs_solo"][name] = {"n": len(ratios), "median_x": statistics.median(ratios),
                                           "max_x": max(ratios)}
    results["hostile"] = {}
    for e in log:
        if e["kind"] == "hostile":
            h = results["hostile"].setdefault(e["name"], {"n": 0, "max_s": 0.0, "outcome": e["outcome"]})
            h["n"] += 1
            h["max_s"] = max(h["max_s"], e["seconds"])
    results["rss_growth_mib"] = round(results["rss_end_mib"] - results["rss_start_mib"], 1)
    return results


def print_load(r: dict) -> None:
    print(f"\n{r['normal_clients']} normal + {r['hostile_clients']} hostile clients, {r['rounds']} rounds, "
          f"{r['load_s']} s")
    print(f"solo seconds: {r['solo_s']}; machine load average {r['load_average_before'][0]:.1f} before, "
          f"{r['load_average_after'][0]:.1f} after")
    for name, s in r["normal_vs_solo"].items():
        print(f"  normal {name:<9} n={s['n']:<3} median {s['median_x']:.2f}x solo, max {s['max_x']:.2f}x "
              f"(target <= 4x)")
    for name, h in r["hostile"].items():
        print(f"  hostile {name:<22} n={h['n']:<3} max {h['max_s']:.2f} s  {h['outcome']}")
    print(f"server RSS: start {r['rss_start_mib']} MiB, peak {r['rss_peak_mib']} MiB, end {r['rss_end_mib']} MiB "
          f"(growth {r['rss_growth_mib']:+} MiB; target within 50 MB)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    it = sub.add_parser("items", help="each attack alone, one process each")
    it.add_argument("--only", nargs="+", choices=list(ITEMS), default=list(ITEMS))
    it.add_argument("--timeout", type=float, default=300.0, help="seconds before a child is killed")
    it.add_argument("--json", type=Path)
    ld = sub.add_parser("load", help="the served app, 8 clients")
    ld.add_argument("--rounds", type=int, default=3)
    ld.add_argument("--normal", type=int, default=2, help="normal visitors")
    ld.add_argument("--hostile", type=int, default=6, help="hostile visitors (0: the normal visitors' own load)")
    ld.add_argument("--attacks", nargs="+", choices=ATTACKS + (ORDINARY,), default=list(ATTACKS),
                    help=f"what the hostile visitors send, in turn; '{ORDINARY}': normal token-table requests")
    ld.add_argument("--json", type=Path)
    one = sub.add_parser("_item")
    one.add_argument("name", choices=list(ITEMS))
    one.add_argument("folder", type=Path)
    args = ap.parse_args(argv)
    if args.command == "_item":
        print(json.dumps(run_item(args.name, args.folder)))
        return 0
    if args.command == "items":
        out = items(args.only, args.timeout)
    else:
        out = load(args.rounds, args.attacks, args.normal, args.hostile)
        print_load(out)
        print(json.dumps({k: v for k, v in out.items() if k != "requests"}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
