"""Load test for `chatforge serve`: N concurrent streaming clients, batching on vs one at a time.

    PYTHONPATH=. python bench/serve_load.py                      # a random model of the cpu preset's size
    PYTHONPATH=. python bench/serve_load.py --model RUN --clients 16 --duration 20 --plot load.png

For each mode the server runs as its own process on a loopback port (`python -m chatforge.serve.command`,
so the clients do not compete with it for the interpreter lock): first with `--max-batch` = the
number of clients (continuous batching), then with `--max-batch 1` (one request at a time, the
rest queue). Each client sends streaming chat completions back to back until the time is up; the
requests still running then are allowed to finish. Reported per mode, as JSON: requests/s,
generated tokens/s, p50/p99 time to first token and whole-request latency, errors, the
server's own rows-per-forward counters from /health, and the server process's memory: resident
set (RSS) once it answers /health and before any request, after the load, and its peak.

    PYTHONPATH=. python bench/serve_load.py --model RUN --modes batched --duration 10   # memory check

Without --model, a random model of the cpu preset's shape (4 layers x 192, vocabulary 2048,
context 128) is created in a temporary folder: its near-uniform next-token distribution rarely
picks a stop token, so nearly every answer runs to --max-tokens and the modes compare like for like.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = [
    "Where was Ada Lovelace born?",
    "What is 17 plus 25?",
    "Tell me a short story about a fox.",
    "Who are you?",
    "List three colours.",
    "What is the capital of France?",
]


def make_random_run(folder: Path) -> Path:
    """A random model of the cpu preset's size with a tokenizer trained on a little text."""
    import torch

    from chatforge.checkpoint import save_model
    from chatforge.model.gpt import GPT, GPTConfig
    from chatforge.tokenizer import Tokenizer

    texts = [
        f"{q} The answer is number {i} of many, said the assistant." for i, q in enumerate(QUESTIONS * 50)
    ]
    tok = Tokenizer.train(texts, 2048)
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=2048, seq_len=128, n_layer=4, n_embd=192, n_head=3, n_kv_head=3)
    run = folder / "random-cpu-size"
    save_model(run, GPT(cfg), tok.to_json(), {"stage": "random"})
    return run


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def start_server(
    run: Path, max_batch: int, db: Path, device: str, threads: int | None
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "chatforge.serve.command", "--model", str(run), "--port", str(port)]
    cmd += ["--max-batch", str(max_batch), "--max-queue", "256", "--db", str(db), "--device", device]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stdout.read().decode()}")
        if time.time() > deadline:
            proc.kill()
            raise SystemExit("the server did not start within 120 s")
        time.sleep(0.3)


FILLER = "Here is some background text that the question comes after, to make the prompt long. "


async def one_request(client: httpx.AsyncClient, model: str, question: str, max_tokens: int) -> dict:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 1.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    ttft, tokens, error = None, 0, None
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    error = chunk["error"]["message"]
                    break
                if ttft is None and any(c["delta"].get("content") for c in chunk["choices"]):
                    ttft = time.perf_counter() - t0
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as e:
        error = f"{type(e).__name__}: {e}"
    if error:
        return {"error": error}
    return {
        "ttft": ttft if ttft is not None else time.perf_counter() - t0,
        "latency": time.perf_counter() - t0,
        "tokens": tokens,
    }


def server_memory_mb(pid: int) -> dict:
    """The server process's resident memory now (VmRSS) and at its peak (VmHWM), in MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = round(int(value.split()[0]) / 1024, 1)
    return {"rss_mb": fields["VmRSS"], "peak_rss_mb": fields["VmHWM"]}


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))], 4)


async def load(url: str, model: str, clients: int, duration: float, max_tokens: int, filler: int = 0) -> dict:
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        await one_request(client, model, "warm up", 4)  # first-call costs out of the measurement
        results: list[dict] = []
        t0 = time.perf_counter()
        deadline = t0 + duration

        kv_peak = {"allocated_tokens": 0, "waiting": 0}

        async def watch() -> None:  # the KV cache's largest allocation and the longest queue seen
            while True:  # until cancelled
                now = (await client.get("/health")).json()
                kv = now["kv_cache"]
                kv_peak["allocated_tokens"] = max(kv_peak["allocated_tokens"], kv["allocated_tokens"])
                kv_peak["budget_tokens"] = kv["budget_tokens"]
                kv_peak["waiting"] = max(kv_peak["waiting"], now["waiting"])
                await asyncio.sleep(0.25)

        async def worker(i: int) -> None:
            k = 0
            while time.perf_counter() < deadline:
                question = FILLER * filler + QUESTIONS[(i + k) % len(QUESTIONS)]
                results.append(await one_request(client, model, question, max_tokens))
                k += 1

        watcher = asyncio.create_task(watch())
        await asyncio.gather(*(worker(i) for i in range(clients)))
        wall = time.perf_counter() - t0
        watcher.cancel()
        health = (await client.get("/health")).json()
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "requests": len(results),
        "errors": len(errors),
        "error_examples": errors[:3],
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(ok) / wall, 3),
        "tokens_per_s": round(tokens / wall, 1),
        "mean_tokens_per_request": round(tokens / max(1, len(ok)), 1),
        "ttft_p50_s": pct([r["ttft"] for r in ok], 50),
        "ttft_p99_s": pct([r["ttft"] for r in ok], 99),
        "latency_p50_s": pct([r["latency"] for r in ok], 50),
        "latency_p99_s": pct([r["latency"] for r in ok], 99),
        "latency_mean_s": round(statistics.fmean(r["latency"] for r in ok), 4) if ok else None,
        "server": health["stats"],
        "kv_cache_peak": kv_peak,
    }


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = ["batched", "one_at_a_time"]
    labels = [f"max-batch {report['config']['clients']}", "max-batch 1"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    axes[0].bar(labels, [report[m]["tokens_per_s"] for m in modes], color=["tab:green", "tab:gray"])
    axes[0].set_title("generated tokens / s")
    for ax, key, title in (
        (axes[1], "ttft", "time to first token (s)"),
        (axes[2], "latency", "request latency (s)"),
    ):
        x = range(len(modes))
        ax.bar([i - 0.2 for i in x], [report[m][f"{key}_p50_s"] for m in modes], 0.4, label="p50")
        ax.bar([i + 0.2 for i in x], [report[m][f"{key}_p99_s"] for m in modes], 0.4, label="p99")
        ax.set_xticks(list(x), labels)
        ax.set_title(title)
        ax.legend()
    c = report["config"]
    fig.suptitle(
        f"chatforge serve: {c['clients']} streaming clients, {c['max_tokens']} tokens each, "
        f"{c['model']}, on {c['device']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model", metavar="RUN", help="run folder to serve (default: a random cpu-preset-sized model)"
    )
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of load per mode")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument(
        "--long-prompts", type=int, default=0, metavar="N",
        help="put N sentences of filler before each question (long prompts fill the KV cache)",
    )  # fmt: skip
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the server")
    ap.add_argument("--modes", default="batched,one_at_a_time", help="which servers to run (comma-separated)")
    ap.add_argument("--out", metavar="FILE.json", help="also write the report here")
    ap.add_argument("--plot", metavar="FILE.png", help="bar charts of the two modes")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="serve_load_"))
    run = Path(args.model) if args.model else make_random_run(tmp)
    report: dict = {
        "config": {
            "model": str(args.model or "random 4x192, vocab 2048, context 128"),
            "clients": args.clients,
            "duration_s": args.duration,
            "max_tokens": args.max_tokens,
            "long_prompts": args.long_prompts,
            "device": args.device,
            "cpu_count": os.cpu_count(),
        }
    }
    modes = args.modes.split(",")
    for mode, max_batch in (("batched", args.clients), ("one_at_a_time", 1)):
        if mode not in modes:
            continue
        print(f"[{mode}] starting the server with --max-batch {max_batch} ...", file=sys.stderr, flush=True)
        proc, url = start_server(run, max_batch, tmp / f"{mode}.sqlite", args.device, args.threads)
        try:
            before = server_memory_mb(proc.pid)
            model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
            report[mode] = asyncio.run(
                load(url, model, args.clients, args.duration, args.max_tokens, args.long_prompts)
            )
            after = server_memory_mb(proc.pid)
            report[mode]["memory"] = {
                "rss_before_requests_mb": before["rss_mb"],
                "rss_after_load_mb": after["rss_mb"],
                "peak_rss_mb": after["peak_rss_mb"],
            }
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        r = report[mode]
        print(
            f"[{mode}] {r['requests']} requests, {r['errors']} errors, {r['tokens_per_s']} tokens/s, "
            f"TTFT p50 {r['ttft_p50_s']} s, latency p50 {r['latency_p50_s']} s, "
            f"rows/forward max {r['server']['max_rows_per_forward']} "
            f"mean {r['server']['mean_rows_per_forward']}; RSS before requests "
            f"{r['memory']['rss_before_requests_mb']} MB, peak {r['memory']['peak_rss_mb']} MB",
            file=sys.stderr,
            flush=True,
        )
    if "batched" in report and "one_at_a_time" in report:
        one = report["one_at_a_time"]["tokens_per_s"]
        report["speedup_tokens_per_s"] = round(report["batched"]["tokens_per_s"] / one, 2) if one else None
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.plot and "speedup_tokens_per_s" in report:
        plot(report, Path(args.plot))
        print(f"plot written to {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
