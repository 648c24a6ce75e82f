"""`chatforge scaling plan`: the compute-optimal model for a budget, from a fit or Chinchilla's constants.

    chatforge scaling plan --flops 1e19
    chatforge scaling plan --budget "2 GPU-hours on H100" [--mfu 0.4] [--fit SWEEP]

A GPU budget becomes FLOPs as hours x 3600 x the GPU's dense bf16 peak (device.py's table) x the MFU
assumed (0.4 by default: what a well-tuned small-model run reaches). The plan also checks the GPU
presets' horizons: each one's C = 6ND against the N and D the law would pick for that C.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from chatforge.config import PRESETS, get_preset
from chatforge.device import GPU_PEAK_FLOPS
from chatforge.errors import ChatforgeError
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.options import ScalingPlanOptions
from chatforge.scaling.fit import CHINCHILLA, Law, ScalingLaw, law_from_fit

BUDGET_RE = re.compile(
    r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*gpu[- ]?hours?\s+(?:on\s+)?(\S+)\s*$", re.IGNORECASE
)


def budget_flops(text: str, mfu: float) -> tuple[float, str]:
    """'2 GPU-hours on H100' -> (FLOPs, how they were computed)."""
    match = BUDGET_RE.match(text)
    if not match:
        raise ChatforgeError(f'bad --budget {text!r}: write e.g. "2 GPU-hours on H100"')
    hours, gpu = float(match.group(1)), match.group(2)
    peak = next((v for k, v in GPU_PEAK_FLOPS.items() if k.lower() == gpu.lower()), None)
    if peak is None:
        raise ChatforgeError(
            f"no peak FLOPs known for {gpu!r}: use one of {', '.join(GPU_PEAK_FLOPS)}, or --flops"
        )
    if not 0 < mfu <= 1:
        raise ChatforgeError(f"--mfu {mfu} must be in (0, 1]")
    flops = hours * 3600 * peak * mfu
    return flops, f"{hours:g} h x {peak:.3g} FLOP/s ({gpu}, bf16 dense peak) x {mfu:g} MFU"


def load_fit(path: str | None) -> tuple[ScalingLaw, str, str, float | None]:
    """(law, which parameters N counts, where it came from, smallest N it was measured on); the law is
    of the form the fit saved."""
    if path is None:
        return Law(**CHINCHILLA), "total", "Chinchilla's published fit (Hoffmann et al. 2022)", None
    p = Path(path)
    for candidate in (p, p / "fit.json", p / "report" / "fit.json"):
        if candidate.is_file():
            fit = json.loads(candidate.read_text())
            if "law" not in fit:
                break
            smallest = min((q["n"] for c in fit.get("isoflop", []) for q in c["points"]), default=None)
            return law_from_fit(fit), fit["params"], str(candidate), smallest
    raise ChatforgeError(f"no fit.json in {p}: run `chatforge scaling fit SWEEP` first, or leave out --fit")


def preset_params(name: str, params: str) -> tuple[int, int]:
    """(N of that kind, tokens D) of a preset's pretraining."""
    import torch

    preset = get_preset(name)
    cfg = preset.pretrain
    mcfg = GPTConfig.from_depth(
        cfg.depth, vocab_size=preset.vocab_size, seq_len=cfg.seq_len, overrides=cfg.model
    )
    with torch.device("meta"):
        model = GPT(mcfg)
    n = model.num_params(non_embedding=params == "nonembedding")
    tokens = (cfg.total_batch_tokens or cfg.device_batch_size * cfg.seq_len) * cfg.max_steps
    return n, tokens


def plan_lines(law: ScalingLaw, params: str, flops: float, smallest: float | None) -> list[str]:
    n_opt, d_opt = (float(x) for x in law.optimum(flops))
    floor = smallest or min(preset_params(name, params)[0] for name in PRESETS)
    if n_opt < floor:
        need = 6 * (floor / (n_opt / (flops / 6) ** law.a_exponent)) ** (1 / law.a_exponent)
        raise ChatforgeError(
            f"C = {flops:.3g} FLOPs gives a compute-optimal model of {n_opt:,.0f} parameters, below the smallest "
            f"model ({floor:,.0f}): give at least --flops {need:.2g}"
        )
    nearest = min(PRESETS, key=lambda name: abs(math.log(preset_params(name, params)[0] / n_opt)))
    return [
        f"compute C = {flops:.3g} FLOPs (C = 6ND, N = {params} parameters)",
        f"  compute-optimal N = {n_opt:,.0f} parameters, D = {d_opt:,.0f} tokens "
        f"({d_opt / n_opt:.1f} tokens per parameter)",
        f"  predicted loss {float(law.loss(n_opt, d_opt)):.3f} nats/token (in the fit's tokenizer and data)",
        f"  nearest preset: {nearest} ({preset_params(nearest, params)[0]:,} parameters)",
    ]


def horizon_lines(law: ScalingLaw, params: str) -> list[str]:
    """Each GPU preset's pretraining against the compute-optimal split of its own compute."""
    lines = ["GPU presets' horizons (preset N, D vs the law's optimum at the same C):"]
    for name in ("d12", "d20"):
        n, d = preset_params(name, params)
        c = 6.0 * n * d
        n_opt, d_opt = (float(x) for x in law.optimum(c))
        lines.append(
            f"  {name}: N {n / 1e6:.0f}M, D {d / 1e9:.2f}B ({d / n:.0f} tokens/param), C {c:.3g}; optimum N "
            f"{n_opt / 1e6:.3g}M, D {d_opt / 1e9:.3g}B ({d_opt / n_opt:.3g} tokens/param); predicted loss "
            f"{float(law.loss(n, d)):.3f} vs {float(law.loss(n_opt, d_opt)):.3f} at the optimum"
        )
    return lines


def cmd_scaling_plan(opts: ScalingPlanOptions) -> None:
    if (opts.flops is None) == (opts.budget is None):
        raise ChatforgeError(
            'give the compute as --flops C (e.g. 1e19) or --budget "2 GPU-hours on H100", one of them'
        )
    law, params, source, smallest = load_fit(opts.fit)
    if opts.budget is not None:
        flops, how = budget_flops(opts.budget, opts.mfu)
    else:
        flops, how = opts.flops, "given"
        if not (flops > 0 and math.isfinite(flops)):
            raise ChatforgeError(f"--flops {flops} must be a positive number of FLOPs, e.g. 1e19")
    print(f"law: {source}: L(N, D) = {law.FORMULA}; {law.summary()}")
    print(f"budget: {how}")
    print("\n".join(plan_lines(law, params, flops, smallest)))
    print("\n".join(horizon_lines(law, params)))
