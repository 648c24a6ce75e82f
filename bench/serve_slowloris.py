"""Is `chatforge serve` still reachable under slow clients and huge prompts? Starts the server in a
subprocess (a tiny random run, or --model RUN), then:

1. slow clients: opens --slow connections that send half a request and stall (half of them in
   the headers, dribbling a header line every --dribble seconds as slowloris does; half in the body),
   and asks GET /health every 0.1 s for --seconds seconds;
2. huge prompts: sends --prompts concurrent chat requests of --prompt-mb MB each, asking /health
   meanwhile.

Prints /health's worst and median latency in each phase (a failed or > 5 s request counts as 5 s),
how many slow connections the server had closed by the end, and a JSON summary.

    PYTHONPATH=. python bench/serve_slowloris.py                       # this checkout
    PYTHONPATH=. python bench/serve_slowloris.py --server-path ../old  # another checkout's server
"""

from __future__ import annotations

import argparse
import concurrent.futures
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

import httpx
from serve_load import free_port  # bench/ is on the path when a bench runs

CAP_S = 5.0  # a /health that fails or takes longer counts as this


def tiny_run(folder: Path) -> Path:
    import torch

    from chatforge.checkpoint import save_model
    from chatforge.model.gpt import GPT, GPTConfig
    from chatforge.tokenizer import Tokenizer

    tok = Tokenizer.train(["Hello there, how are you today? I am fine, thank you very much."] * 40, 300)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=300, seq_len=256, n_layer=1, n_embd=32, n_head=2, n_kv_head=1))
    run = folder / "tinyrun"
    save_model(run, model, tok.to_json(), {"stage": "bench"})
    return run


def start_server(run: Path, port: int, server_path: str | None, db: Path) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(server_path or Path(__file__).parent.parent).resolve())
    cmd = [sys.executable, "-m", "chatforge.serve.command", "--model", str(run), "--port", str(port)]
    cmd += ["--db", str(db), "--device", "cpu"]
    # run from the temporary folder: `python -m` puts the working directory first on the path
    proc = subprocess.Popen(cmd, env=env, cwd=db.parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read().decode()[-2000:]}")
        if time.time() > deadline:
            proc.kill()
            raise SystemExit("the server did not start in 120 s")
        time.sleep(0.2)


def health_latencies(url: str, stop: threading.Event, out: list[float]) -> None:
    with httpx.Client(timeout=CAP_S) as c:
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                ok = c.get(url + "/health").status_code == 200
            except httpx.HTTPError:
                ok = False
            out.append(time.perf_counter() - t0 if ok else CAP_S)
            time.sleep(0.1)


def summary(lat: list[float]) -> dict:
    return {
        "requests": len(lat),
        "max_s": round(max(lat), 3),
        "median_s": round(statistics.median(lat), 3),
        "over_1s": sum(x > 1.0 for x in lat),
    }


def slow_clients(port: int, n: int, seconds: float, dribble: float, url: str) -> dict:
    socks, t0 = [], time.perf_counter()
    for i in range(n):
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
        except OSError:
            break
        if i % 2 == 0:  # stalls in the headers
            s.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-a: b\r\n")
        else:  # stalls in the body
            s.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                b'Content-Length: 100000\r\n\r\n{"model": '
            )
        s.setblocking(False)
        socks.append(s)
    opened = len(socks)
    lat: list[float] = []
    stop = threading.Event()
    poller = threading.Thread(target=health_latencies, args=(url, stop, lat))
    poller.start()
    closed, answered, next_dribble = set(), {}, time.perf_counter() + dribble
    while time.perf_counter() - t0 < seconds:
        for k, s in enumerate(socks):
            if k in closed:
                continue
            try:
                got = s.recv(4096)
                if got == b"":
                    closed.add(k)
                elif k not in answered:  # e.g. 408 for a body that came too slowly
                    answered[k] = got.split(b"\r\n", 1)[0].decode("latin-1")
            except BlockingIOError:
                pass
            except OSError:
                closed.add(k)
        if time.perf_counter() > next_dribble:
            next_dribble += dribble
            for k, s in enumerate(socks):
                if k % 2 == 0 and k not in closed:
                    try:
                        s.send(b"X-b: c\r\n")
                    except OSError:
                        closed.add(k)
        time.sleep(0.2)
    stop.set()
    poller.join()
    for s in socks:
        s.close()
    statuses = sorted(set(answered.values()))
    return {
        "slow_connections": opened,
        "closed_by_server": len(closed),
        "answered": {st: list(answered.values()).count(st) for st in statuses},
        "health": summary(lat),
    }


def huge_prompts(url: str, n: int, mb: float) -> dict:
    text = "hello there " * int(mb * 1_000_000 / 12)
    model = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 1}
    lat: list[float] = []
    stop = threading.Event()
    poller = threading.Thread(target=health_latencies, args=(url, stop, lat))
    poller.start()
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        futures = [
            pool.submit(httpx.post, url + "/v1/chat/completions", json=body, timeout=120) for _ in range(n)
        ]
        statuses = []
        for f in futures:
            try:
                r = f.result()
                statuses.append(f"{r.status_code} {r.json().get('error', {}).get('code')}")
            except (httpx.HTTPError, ValueError) as e:
                statuses.append(type(e).__name__)
    took = time.perf_counter() - t0
    time.sleep(0.3)
    stop.set()
    poller.join()
    return {
        "prompts": n,
        "mb_each": mb,
        "statuses": statuses,
        "seconds": round(took, 2),
        "health": summary(lat),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="run folder to serve (default: a tiny random one)")
    ap.add_argument("--server-path", help="PYTHONPATH for the server (another checkout), default this one")
    ap.add_argument("--slow", type=int, default=250, help="slow connections (default 250)")
    ap.add_argument("--seconds", type=float, default=20, help="how long the slow phase lasts (default 20)")
    ap.add_argument("--dribble", type=float, default=3, help="seconds between a slow client's header lines")
    ap.add_argument("--prompts", type=int, default=8, help="concurrent huge prompts (default 8)")
    ap.add_argument("--prompt-mb", type=float, default=1.0, help="size of each (default 1 MB)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="slowloris_") as tmp:
        run = Path(args.model) if args.model else tiny_run(Path(tmp))
        port = free_port()
        proc = start_server(run, port, args.server_path, Path(tmp) / "fb.sqlite")
        url = f"http://127.0.0.1:{port}"
        try:
            slow = slow_clients(port, args.slow, args.seconds, args.dribble, url)
            print(f"slow clients: {json.dumps(slow)}", flush=True)
            big = huge_prompts(url, args.prompts, args.prompt_mb)
            print(f"huge prompts: {json.dumps(big)}", flush=True)
        finally:
            proc.kill()
            proc.wait()
    report = {"slow_clients": slow, "huge_prompts": big}
    print(json.dumps(report, indent=2))
    ok = slow["health"]["max_s"] < 1.0 and big["health"]["max_s"] < 1.0
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
