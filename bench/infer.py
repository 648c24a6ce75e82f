"""Inference speed on CPU: chatforge's engine (fp32, bf16, int8, int4) beside HF transformers
`generate` and llama.cpp.

Engines: chatforge (fp32, decode_layout: every matmul split across the threads), chatforge-1core
(fp32 with each matmul on one core, as torch runs a matrix-vector product), chatforge-bf16,
chatforge-int8 and chatforge-int4 (model/quant.py; the kernel this CPU gets, recorded in the JSON;
`chatforge-int8-KERNEL`, `chatforge-int4-KERNEL` or `chatforge-int4-gN` ask for a kernel or an int4
group size; a `-compiled` suffix compiles the decode step, `quant.compile_decode`, and records
the first generation's seconds, which pay the compile, as `compile_s`), hf, and llamacpp (the shipped Q4_1 GGUF) / llamacpp-q8_0 (the run exported by
`chatforge export gguf --dtype q8_0`) when llama-cpp-python is importable by --llamacpp-python
(never a dependency of chatforge: build it in a venv of its own).

    python bench/infer.py --model smollm2 --new-tokens 128 --threads 2
    python bench/infer.py --model runs/demo --engines chatforge,hf --runs 3 --rounds 2
    python bench/infer.py --threads 1 --engines chatforge,chatforge-int8,chatforge-int4,hf,llamacpp \
        --llamacpp-python /path/to/venv/bin/python

For each engine, in its own process (so peak memory is its own): load the weights, one warm-up
generation, then --runs timed greedy generations of exactly --new-tokens tokens from the same prompt
ids (no stop ids for chatforge; min_new_tokens for HF, so neither stops early). Reported per engine:
time to first token (TTFT), prefill tokens/s (prompt tokens / TTFT), decode tokens/s (tokens after
the first / time after the first), peak and final RSS, and the quality cost of bf16 / int8 as bits
per byte on held-out text: `bpb` from full forwards (the prompt path), and for chatforge fp32 / int8
`bpb_decode_path`, one token per forward through the KV cache as generation runs (for int8 that is
the path whose activations fbgemm rounds to 7 bits). HF runs the same weights, exported with
chatforge.model.hf.export_hf, in float32 with its default (dynamic) cache.

--rounds R runs every engine R times, alternating, so load from other processes hits all of them;
the figures are medians over all timed runs, and the speedup is the median of per-round ratios.
A `kernels` section times one decode-sized matmul each way (why quant.py chose what it chose).
Writes JSON (--out) and a PNG of decode tokens/s and TTFT beside it.

On a machine whose cores are busy with other work, use --threads 1: with 2 threads every parallel
matmul waits for both threads to be scheduled, and all engines slow down several-fold, erratically.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ENGINES = (
    "chatforge",
    "chatforge-1core",  # fp32 with each matmul on one core (decode_layout(parts=1)), as torch's own
    "chatforge-bf16",
    "chatforge-int8",
    "chatforge-int4",
    "chatforge-int4-compiled",
    "hf",
    "llamacpp",
    "llamacpp-q8_0",
)
DATA = Path("/work/shared/data")
DEFAULT_TEXT = [DATA / "tinystories/tinystories_val.txt", DATA / "python_docs/_sources/glossary.rst.txt"]
DEFAULT_PROMPT = (
    "Explain how a large language model writes an answer, one token at a time, in a few paragraphs."
)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def rss_mb() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process in MB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open("/proc/self/status") as f:
        cur = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
    return cur, peak


# ==================================================================== worker: one engine, one process


def heldout_text(files: list[str], nbytes: int) -> list[str]:
    """The first ~nbytes of each file, cut at a line end (benchmarks may read /work/shared/data)."""
    texts = []
    for f in files:
        raw = Path(f).read_text(encoding="utf-8", errors="replace")[: nbytes + 2000]
        cut = raw[:nbytes].rfind("\n")
        texts.append(raw[: cut if cut > 0 else nbytes])
    return texts


def bpb(model, tok, texts: list[str], row_len: int) -> dict:
    """Bits per byte (chatforge/eval/bpb.py) of `model` on the texts, packed into rows of row_len."""
    import torch

    from chatforge.eval.bpb import _batches, bits_per_byte, pack_rows

    x, y = pack_rows([tok.start_ids() + tok.encode(t) for t in texts], row_len)
    token_bytes = torch.tensor(tok.token_byte_lengths(), dtype=torch.int64)
    loss, value = bits_per_byte(model, _batches(x, y, 4), token_bytes, "cpu")
    return {"bpb": value, "loss_nats": loss, "tokens": int((y >= 0).sum())}


def decode_bpb(model, tok, texts: list[str], max_tokens: int) -> dict:
    """Bits per byte as generation computes it: one token per forward through the KV cache (teacher forced),
    over the first max_tokens tokens of each text. For int8 this is the path with 8-bit activations."""
    import math

    import torch

    from chatforge.model.gpt import KVCache

    lengths = tok.token_byte_lengths()
    nats = nbytes = 0.0
    for text in texts:
        ids = (tok.start_ids() + tok.encode(text))[: max_tokens + 1]
        cache = KVCache(model.cfg, 1, len(ids), dtype=next(model.parameters()).dtype)
        for t in range(len(ids) - 1):
            step = getattr(model, "decode_step", None) or model  # the compiled step, where there is one
            logits = step(torch.tensor([ids[t : t + 1]]), cache=cache)[0, -1].float()
            if lengths[ids[t + 1]] > 0:
                nats += float(torch.log_softmax(logits, -1)[ids[t + 1]].neg())
                nbytes += lengths[ids[t + 1]]
    return {"bpb": nats / math.log(2) / nbytes, "bytes": int(nbytes)}


class HFLoss:
    """Wraps an HF causal LM so chatforge's bits_per_byte can call it like GPT: model(x, y, loss_reduction)."""

    def __init__(self, hf) -> None:
        self.hf = hf
        self.training = False

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def __call__(self, x, y, loss_reduction="none"):
        import torch.nn.functional as F

        logits = self.hf(input_ids=x).logits.float()
        return F.cross_entropy(logits.flatten(0, 1), y.reshape(-1), ignore_index=-1, reduction=loss_reduction)


def chatforge_format(engine: str) -> dict:
    """chatforge[-1core | -bf16 | -int8[-KERNEL] | -int4[-KERNEL][-gN]][-compiled] -> how its worker
    loads the run: {"mode": None / "bf16" / "int8" / "int4", "kernel": None or a name, "group_size":
    int or None, "parts": None or 1, "compiled": bool}. SystemExit for a name that is none of these."""
    words = engine.split("-")
    fmt: dict = {"mode": None, "kernel": None, "group_size": None, "parts": None, "compiled": False}
    if words[0] != "chatforge":
        raise SystemExit(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
    rest = words[1:]
    if rest and rest[-1] == "compiled":
        fmt["compiled"] = rest.pop() == "compiled"
    if rest == ["1core"]:
        return {**fmt, "parts": 1}
    if rest and rest[0] in ("bf16", "int8", "int4"):
        fmt["mode"] = rest.pop(0)
        if fmt["mode"] == "int4" and rest and rest[-1][:1] == "g" and rest[-1][1:].isdigit():
            fmt["group_size"] = int(rest.pop()[1:])
        if fmt["mode"] != "bf16" and len(rest) == 1:
            fmt["kernel"] = rest.pop()
    if rest:
        raise SystemExit(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
    return fmt


def llamacpp_worker(spec: dict) -> dict:
    """The llamacpp engines, run by --llamacpp-python (which need not have torch): the same prompt
    ids, greedy, exactly new_tokens tokens, timed as chatforge is; bits per byte on the same packed
    rows of held-out text, from a second instance that keeps every position's logits."""
    import numpy as np
    from llama_cpp import Llama

    ids, n, threads = spec["prompt_ids"], spec["new_tokens"], spec["threads"]
    t0 = time.perf_counter()
    common = {"model_path": spec["gguf"], "n_threads": threads, "n_threads_batch": threads, "verbose": False}
    llm = Llama(n_ctx=len(ids) + n + 16, n_batch=512, **common)

    def run_once() -> tuple[list[float], list[int]]:
        llm.reset()  # forget the last run's tokens, so the prompt is evaluated again
        times, tokens = [], []
        sampling = {"top_k": 1, "top_p": 1.0, "min_p": 0.0, "temp": 0.0, "repeat_penalty": 1.0}
        for t in llm.generate(ids, reset=True, **sampling):
            times.append(time.perf_counter())
            tokens.append(int(t))
            if len(tokens) == n:
                break
        return times, tokens

    out: dict = {"engine": spec["engine"], "load_s": time.perf_counter() - t0, "gguf": spec["gguf"]}
    out.update(timed_runs(spec, run_once))
    out["rss_mb"], out["peak_rss_mb"] = rss_mb()
    rows = spec.get("bpb_rows")
    if rows:
        log(f"  {spec['engine']}: bits per byte on {len(rows['x'])} rows of held-out text")
        scorer = Llama(n_ctx=len(rows["x"][0]) + 16, n_batch=len(rows["x"][0]), logits_all=True, **common)
        token_bytes = np.array(spec["token_bytes"])
        nats = tokens = nats_on_bytes = nbytes = 0.0
        for x, y in zip(rows["x"], rows["y"], strict=True):
            valid = sum(t >= 0 for t in y)
            scorer.reset()
            scorer.eval(x[:valid])
            logits = np.asarray(scorer.scores[:valid], dtype=np.float64)
            top = logits.max(axis=-1, keepdims=True)
            logp = logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))
            target = np.array(y[:valid])
            loss = -logp[np.arange(valid), target]
            counted = token_bytes[target] > 0
            nats, tokens = nats + loss.sum(), tokens + valid
            nats_on_bytes, nbytes = nats_on_bytes + loss[counted].sum(), nbytes + token_bytes[target].sum()
        out["quality"] = {
            "bpb": nats_on_bytes / np.log(2) / nbytes,
            "loss_nats": nats / tokens,
            "tokens": tokens,
        }
    return out


def timed_runs(spec: dict, run_once) -> dict:
    """One warm-up, then spec["runs"] timed generations of exactly new_tokens tokens: per run TTFT,
    prefill tokens/s and decode tokens/s, and the last run's tokens."""
    engine, n, prompt_len = spec["engine"], spec["new_tokens"], len(spec["prompt_ids"])
    runs = []
    for i in range(spec["runs"] + 1):  # the first is the warm-up
        start = time.perf_counter()
        times, tokens = run_once()
        if len(tokens) != n:
            raise RuntimeError(f"{engine} generated {len(tokens)} tokens, expected {n}")
        ttft, decode = times[0] - start, (n - 1) / (times[-1] - times[0])
        log(
            f"  {engine} {f'run {i}' if i else 'warm-up'}: TTFT {ttft * 1000:.0f} ms, decode {decode:.1f} tok/s"
        )
        if i:
            runs.append({"ttft_s": ttft, "prefill_tok_s": prompt_len / ttft, "decode_tok_s": decode})
    return {"runs": runs, "tokens": tokens}


def worker(spec: dict) -> dict:
    if spec["engine"].startswith("llamacpp"):
        return llamacpp_worker(spec)
    import torch

    torch.set_num_threads(spec["threads"])
    engine, ids, n = spec["engine"], spec["prompt_ids"], spec["new_tokens"]
    from chatforge.tokenizer import Tokenizer

    tok = Tokenizer.load(spec["run"])
    texts = heldout_text(spec["text"], spec["ppl_bytes"]) if spec["ppl_bytes"] else []
    t0 = time.perf_counter()
    if engine == "hf":
        from transformers import AutoModelForCausalLM
        from transformers.generation.streamers import BaseStreamer

        model = AutoModelForCausalLM.from_pretrained(spec["hf_dir"], dtype=torch.float32).eval()

        class Clock(BaseStreamer):  # generate() calls put() with the prompt, then with each new token
            def __init__(self) -> None:
                self.times: list[float] = []
                self.tokens: list[int] = []
                self.prompt_seen = False

            def put(self, value) -> None:
                if not self.prompt_seen:
                    self.prompt_seen = True
                    return
                self.times.append(time.perf_counter())
                self.tokens += value.view(-1).tolist()

            def end(self) -> None:
                pass

        input_ids = torch.tensor([ids])

        def run_once() -> tuple[list[float], list[int]]:
            clock = Clock()
            with torch.inference_mode():
                model.generate(
                    input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    streamer=clock,
                    pad_token_id=model.generation_config.pad_token_id or 0,
                )
            return clock.times, clock.tokens

        quality_model = HFLoss(model)
    else:
        from chatforge.checkpoint import load_run
        from chatforge.engine import generate
        from chatforge.model.quant import (
            INT4_GROUP_SIZE,
            compile_decode,
            inference_model,
            quantization_kernels,
        )

        fmt = chatforge_format(engine)
        model = inference_model(
            load_run(spec["run"]).model,
            fmt["mode"],
            fmt["parts"],
            fmt["kernel"],
            fmt["group_size"] or INT4_GROUP_SIZE,
        )
        compile_s = None
        if fmt["compiled"]:
            compile_decode(model)
            start = time.perf_counter()
            list(generate(model, ids, 3, temperature=0.0))  # the first steps compile (or load the cache)
            compile_s = time.perf_counter() - start
            log(f"  {engine}: first generation (the compile) took {compile_s:.1f} s")

        def run_once() -> tuple[list[float], list[int]]:
            times, tokens = [], []
            for t in generate(model, ids, n, temperature=0.0):
                times.append(time.perf_counter())
                tokens.append(t)
            return times, tokens

        quality_model = model
    out: dict = {"engine": engine, "load_s": time.perf_counter() - t0}
    if engine.startswith("chatforge"):
        out["compile_s"] = compile_s
        out["kernels"] = quantization_kernels(model)
    out.update(timed_runs(spec, run_once))
    out["rss_mb"], out["peak_rss_mb"] = rss_mb()
    if texts:
        log(f"  {engine}: bits per byte on {sum(len(t) for t in texts)} chars of held-out text")
        with torch.inference_mode():
            out["quality"] = bpb(quality_model, tok, texts, spec["row_len"])
            if engine != "hf" and chatforge_format(engine)["mode"] != "bf16" and spec["decode_bpb_tokens"]:
                log(
                    f"  {engine}: bits per byte through the decode path ({spec['decode_bpb_tokens']} tokens a text)"
                )
                out["quality_decode_path"] = decode_bpb(model, tok, texts, spec["decode_bpb_tokens"])
    return out


# ==================================================================== kernels: why quant.py picked what it picked


def kernels(threads: int, calls: int = 60, rounds: int = 5) -> dict:
    """Median microseconds per decode-sized (1 x 576) @ (576 x 1536) matmul, each way, interleaved."""
    import warnings

    import torch
    import torch.nn.functional as F

    from chatforge.model.quant import (
        INT4_GROUP_SIZE,
        Int4Linear,
        Int8Linear,
        SplitLinear,
        int8_weights,
        kernel_problem,
    )

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    n_in, n_out, copies = 576, 1536, 64  # 64 different matrices: more than the caches hold, as in a model
    lins = [torch.nn.Linear(n_in, n_out, bias=False) for _ in range(copies)]
    row_major = [lin.weight.detach().contiguous() for lin in lins]
    col_major = [w.t().contiguous().t() for w in row_major]
    q = [int8_weights(w) for w in row_major]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fbgemm = [Int8Linear(lin) for lin in lins]
    for lin, w in zip(lins, col_major, strict=True):
        lin.weight.data = w
    split = [SplitLinear(lin, threads) for lin in lins]  # decode_layout's column-major weight, in parts
    packed = {k: kernel_problem(k) is None for k in ("int8pack", "int4pack")}
    int8pack = [Int8Linear(lin, "int8pack") for lin in lins] if packed["int8pack"] else None
    int4pack = [Int4Linear(lin, INT4_GROUP_SIZE, "int4pack") for lin in lins] if packed["int4pack"] else None
    x = torch.randn(1, n_in)
    ways = {
        "fp32 F.linear, weight (out,in) row-major": lambda i: F.linear(x, row_major[i]),
        "fp32 F.linear, weight column-major": lambda i: F.linear(x, col_major[i]),
        f"fp32 column-major in {threads} parts, one bmm (decode_layout)": lambda i: split[i](x),
        "int8 dequantize then F.linear": lambda i: F.linear(x, q[i][0].float()) * q[i][1],
        "int8 fbgemm dynamic (Int8Linear)": lambda i: fbgemm[i](x),
    }
    if int8pack:
        ways["int8 aten._weight_int8pack_mm, bf16 activations (Int8Linear int8pack)"] = lambda i: int8pack[i](
            x
        )
    if int4pack:
        ways[f"int4 aten._weight_int4pack_mm_for_cpu, groups of {INT4_GROUP_SIZE} (Int4Linear)"] = lambda i: (
            int4pack[i](x)
        )
    times: dict[str, list[float]] = {k: [] for k in ways}
    with torch.inference_mode():
        for _ in range(rounds):
            for name, f in ways.items():
                t = time.perf_counter()
                for c in range(calls):
                    f(c % copies)
                times[name].append((time.perf_counter() - t) / calls * 1e6)
    return {name: round(statistics.median(v), 1) for name, v in times.items()}


# ==================================================================== driver


def prepare(args) -> tuple[Path, Path | None, list[int]]:
    """The chatforge run folder (importing SmolLM2 once), its HF export, and the prompt ids."""
    from chatforge.chat_format import render_prompt
    from chatforge.tokenizer import Tokenizer

    work = Path(args.work)
    if args.model == "smollm2":
        from chatforge.model.io import import_gguf, smollm2_path

        run = work / "smollm2_run"
        if not (run / "config.json").is_file():
            log(f"importing SmolLM2 GGUF into {run} (once)")
            import_gguf(smollm2_path(), run)
    else:
        run = Path(args.model)
    hf_dir = None
    if "hf" in args.engines:
        from chatforge.model.hf import export_hf

        hf_dir = work / f"hf_{run.resolve().name}"
        if (
            not (hf_dir / "config.json").is_file()
            or (hf_dir / "config.json").stat().st_mtime < (run / "config.json").stat().st_mtime
        ):
            log(f"exporting {run} to HF format in {hf_dir}")
            export_hf(run, hf_dir)
    tok = Tokenizer.load(run)
    ids = render_prompt(tok, [{"role": "user", "content": args.prompt}])
    return run, hf_dir, ids


def llamacpp_ready(python: str) -> str | None:
    """None when `python` can import llama_cpp; else why not, in one line."""
    try:
        proc = subprocess.run([python, "-c", "import llama_cpp"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{python}: {e}"
    if proc.returncode:
        lines = proc.stderr.strip().splitlines()
        return f"{python} cannot import llama_cpp ({lines[-1] if lines else 'exit ' + str(proc.returncode)})"
    return None


def gguf_for(engine: str, run: Path, args) -> str:
    """llamacpp: the shipped SmolLM2 Q4_1 file (only for --model smollm2); llamacpp-q8_0: the run
    exported to a q8_0 GGUF by chatforge (cached in --work)."""
    from chatforge.model.io import export_gguf, smollm2_path

    if engine == "llamacpp":
        if args.model != "smollm2":
            raise SystemExit(
                "engine llamacpp runs the shipped SmolLM2 GGUF: use --model smollm2 (or llamacpp-q8_0)"
            )
        return str(smollm2_path())
    out = Path(args.work) / f"{run.resolve().name}.q8_0.gguf"
    if not out.is_file() or out.stat().st_mtime < (run / "config.json").stat().st_mtime:
        log(f"exporting {run} to {out} (q8_0)")
        export_gguf(run, out, "q8_0")
    return str(out)


def llamacpp_quality_inputs(run: Path, args) -> dict:
    """The packed rows of held-out text (as chatforge's bpb packs them) and each token's byte
    length, for the llamacpp worker, which has no chatforge tokenizer."""
    from chatforge.eval.bpb import pack_rows
    from chatforge.tokenizer import Tokenizer

    tok = Tokenizer.load(run)
    texts = heldout_text(args.text, args.ppl_bytes)
    x, y = pack_rows([tok.start_ids() + tok.encode(t) for t in texts], args.row_len)
    return {"bpb_rows": {"x": x.tolist(), "y": y.tolist()}, "token_bytes": tok.token_byte_lengths()}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.partition(":")[2].strip() for ln in f if ln.startswith("model name")), "unknown")
    except OSError:
        return "unknown"


def run_worker(spec: dict) -> dict:
    """One engine in a process of its own (llamacpp ones under spec["python"]); the spec goes in on stdin."""
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "MKL_NUM_THREADS": str(spec["threads"])}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    python = spec.get("python", sys.executable)
    proc = subprocess.run(
        [python, __file__, "--worker", "-"],
        input=json.dumps(spec),
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{spec['engine']} worker failed (exit {proc.returncode}); see its stderr above")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def matching_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def summarize(results: dict[str, list[dict]], baseline: str) -> dict:
    rows: dict[str, dict] = {}
    for engine, outs in results.items():
        timed = [r for o in outs for r in o.get("runs", [])]
        row: dict = {"rounds": len(outs)}
        for key in ("kernels", "gguf"):
            if key in outs[0]:
                row[key] = outs[0][key]
        if timed:
            for key in ("decode_tok_s", "prefill_tok_s", "ttft_s"):
                row[key] = round(statistics.median(r[key] for r in timed), 4 if key == "ttft_s" else 2)
            row["decode_tok_s_all_runs"] = [round(r["decode_tok_s"], 2) for r in timed]
            row["peak_rss_mb"] = round(max(o["peak_rss_mb"] for o in outs), 1)
            row["rss_after_mb"] = round(statistics.median(o["rss_mb"] for o in outs), 1)
            row["load_s"] = round(statistics.median(o["load_s"] for o in outs), 2)
            if (
                outs[0].get("compile_s") is not None
            ):  # each round's process compiles (cold, then from the cache)
                row["compile_s_per_round"] = [round(o["compile_s"], 1) for o in outs]
        if "quality" in outs[0]:
            row["bpb"] = round(outs[0]["quality"]["bpb"], 5)
            row["loss_nats"] = round(outs[0]["quality"]["loss_nats"], 5)
        if "quality_decode_path" in outs[0]:
            row["bpb_decode_path"] = round(outs[0]["quality_decode_path"]["bpb"], 5)
        rows[engine] = row
    fp32 = rows.get("chatforge", {})
    for row in rows.values():
        for key in ("bpb", "bpb_decode_path"):
            if key in row and key in fp32:
                row[f"{key}_cost_vs_fp32"] = round(row[key] - fp32[key], 5)
    # token agreement: each engine's greedy tokens against the baseline's (and fp32 chatforge's)
    ref_tokens = {e: outs[0]["tokens"] for e, outs in results.items() if "tokens" in outs[0]}
    for engine, toks in ref_tokens.items():
        for ref in {baseline, "chatforge"} - {engine}:
            if ref in ref_tokens:
                rows[engine][f"first_tokens_matching_{ref}"] = matching_prefix(toks, ref_tokens[ref])
                rows[engine][f"equal_positions_vs_{ref}"] = sum(
                    x == y for x, y in zip(toks, ref_tokens[ref], strict=True)
                )
    # speedup over the baseline: per round, then the median
    if baseline in results:
        for engine, outs in results.items():
            if engine == baseline or not all(o.get("runs") for o in outs + results[baseline]):
                continue
            ratios = [
                statistics.median(r["decode_tok_s"] for r in o["runs"])
                / statistics.median(r["decode_tok_s"] for r in b["runs"])
                for o, b in zip(outs, results[baseline], strict=True)
            ]
            rows[engine][f"decode_speedup_vs_{baseline}"] = round(statistics.median(ratios), 3)
            rows[engine][f"decode_speedup_vs_{baseline}_per_round"] = [round(r, 3) for r in ratios]
    return rows


def plot(rows: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [e for e, r in rows.items() if "decode_tok_s" in r]
    if not timed:  # a quality-only run (--runs 0): nothing to draw
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    colors = ["#4c72b0" if e.startswith("chatforge") else "#dd8452" for e in timed]
    for ax, key, label in (
        (axes[0], "decode_tok_s", "decode tokens/s (higher is better)"),
        (axes[1], "ttft_s", "time to first token, s (lower is better)"),
    ):
        vals = [rows[e][key] for e in timed]
        ax.barh(timed, vals, color=colors)
        for i, v in enumerate(vals):
            ax.text(v, i, f" {v:.3g}", va="center")
        ax.set_xlim(0, max(vals) * 1.2)  # room for the labels
        ax.set_xlabel(label)
        ax.invert_yaxis()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="a chatforge run folder, or 'smollm2' (imported once)")
    ap.add_argument("--prompt", default=DEFAULT_PROMPT, help="user message, rendered as a chat prompt")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3, help="timed runs per engine per round (after a warm-up)")
    ap.add_argument("--rounds", type=int, default=1, help="repeat every engine this many times, alternating")
    ap.add_argument("--engines", default=",".join(ENGINES), help=f"comma list of {', '.join(ENGINES)}")
    ap.add_argument(
        "--quantize",
        default=None,
        choices=["bf16", "int8", "int4"],
        help="only chatforge-QUANTIZE beside chatforge and hf",
    )
    ap.add_argument("--text", nargs="*", default=[str(p) for p in DEFAULT_TEXT], help="held-out text for bpb")
    ap.add_argument("--ppl-bytes", type=int, default=6000, help="chars of each --text file; 0 = skip quality")
    ap.add_argument("--row-len", type=int, default=256, help="tokens per row for bits per byte")
    ap.add_argument(
        "--decode-bpb-tokens", type=int, default=400, help="tokens a text for the decode-path bpb (0 = skip)"
    )
    ap.add_argument("--no-kernels", action="store_true", help="skip the matmul micro-benchmark")
    ap.add_argument(
        "--work", default="/tmp/chatforge_bench", help="where the import and HF export are cached"
    )
    ap.add_argument("--out", default="docs/img/infer.json", help="JSON here, PNG beside it")
    ap.add_argument(
        "--llamacpp-python",
        default=sys.executable,
        help="a Python that can import llama_cpp, for the llamacpp engines (skipped when it cannot)",
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(sys.stdin.read()))))
        return

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if args.quantize:
        engines = ["chatforge", f"chatforge-{args.quantize}", "hf"]
    for e in engines:
        if e.startswith("chatforge"):
            chatforge_format(e)  # SystemExit for a malformed name
        elif e not in ENGINES:
            raise SystemExit(f"unknown engine {e!r}; choose from {', '.join(ENGINES)}")
    if any(e.startswith("llamacpp") for e in engines):
        problem = llamacpp_ready(args.llamacpp_python)
        if problem:
            log(f"llamacpp engines skipped: {problem}")
            engines = [e for e in engines if not e.startswith("llamacpp")]
    args.engines = engines
    if args.ppl_bytes:
        missing = [t for t in args.text if not Path(t).is_file()]
        if missing:
            raise SystemExit(f"held-out text {missing[0]} is missing; give --text FILE... or --ppl-bytes 0")
    run, hf_dir, ids = prepare(args)
    base = {
        "run": str(run),
        "hf_dir": str(hf_dir) if hf_dir else None,
        "prompt_ids": ids,
        "new_tokens": args.new_tokens,
        "threads": args.threads,
        "runs": args.runs,
        "text": args.text,
        "ppl_bytes": args.ppl_bytes,
        "row_len": args.row_len,
        "decode_bpb_tokens": args.decode_bpb_tokens,
    }
    for e in engines:
        if e.startswith("llamacpp"):
            base[e] = {"gguf": gguf_for(e, run, args), "python": args.llamacpp_python}
    if args.ppl_bytes and any(e.startswith("llamacpp") for e in engines):
        base["llamacpp_quality"] = llamacpp_quality_inputs(run, args)
    log(f"prompt: {len(ids)} tokens; {args.new_tokens} new tokens; {args.threads} threads; engines {engines}")
    results: dict[str, list[dict]] = {e: [] for e in engines}
    for rnd in range(args.rounds):
        order = engines if rnd % 2 == 0 else engines[::-1]  # alternate, so drifting load hits all
        for engine in order:
            log(f"round {rnd + 1}/{args.rounds}: {engine}")
            # quality is deterministic: measure it in the first round only
            spec = {**base, "engine": engine, "ppl_bytes": args.ppl_bytes if rnd == 0 else 0}
            spec = {k: v for k, v in spec.items() if k not in engines and k != "llamacpp_quality"}
            if engine.startswith("llamacpp"):
                spec.update(base[engine])
                if rnd == 0 and "llamacpp_quality" in base:
                    spec.update(base["llamacpp_quality"])
            results[engine].append(run_worker(spec))
    baseline = "hf" if "hf" in results else engines[0]
    rows = summarize(results, baseline)
    import torch

    from chatforge.model.quant import KERNEL_OPS, cpu_features

    report = {
        "what": "greedy generation, same prompt ids and weights; medians over timed runs (see bench/infer.py)",
        "model": str(run),
        "prompt_tokens": len(ids),
        "new_tokens": args.new_tokens,
        "threads": args.threads,
        "runs_per_round": args.runs,
        "rounds": args.rounds,
        "torch": torch.__version__,
        "cpu": cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_features": cpu_features(),
        "cpu_count": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)),
        "kernel_ops": KERNEL_OPS,
        "loadavg_at_end": os.getloadavg(),
        "heldout_text": {"files": args.text, "chars_each": args.ppl_bytes, "row_len": args.row_len},
        "engines": rows,
    }
    if not args.no_kernels:
        log("kernels: one decode-sized matmul each way")
        report["kernels_us_per_call_1x576_by_576x1536"] = kernels(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from chatforge.fileio import atomic_write_text

    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    png = out.with_suffix(".png")
    title = f"{Path(run).name}: {len(ids)}-token prompt, {args.new_tokens} new tokens, {args.threads} threads"
    try:
        plot(rows, png, title)
    except ImportError:
        png = "no plot (matplotlib is not installed)"
    log(f"wrote {out} and {png}")
    for engine, row in rows.items():
        parts = [f"{engine:18s}"]
        if "decode_tok_s" in row:
            parts.append(
                f"decode {row['decode_tok_s']:7.2f} tok/s  TTFT {row['ttft_s'] * 1000:7.0f} ms  "
                f"prefill {row['prefill_tok_s']:7.1f} tok/s  peak RSS {row['peak_rss_mb']:6.0f} MB"
            )
        if "bpb" in row:
            parts.append(f"bpb {row['bpb']:.4f}")
        if "bpb_decode_path" in row:
            parts.append(f"(decode path {row['bpb_decode_path']:.4f})")
        if f"decode_speedup_vs_{baseline}" in row:
            parts.append(f"x{row[f'decode_speedup_vs_{baseline}']:.2f} vs {baseline}")
        print("  ".join(parts))


if __name__ == "__main__":
    main()
