"""`chatforge eval`: load a run folder's model, build the named tasks, run them, report.

chatforge eval --model runs/sft --world world --tasks world_forward,world_reverse,bpb
chatforge eval --model runs/base --mc data/arc/arc_easy.jsonl --max-examples 200
chatforge eval --model runs/sft --tools-file runs/sft_data/eval_tools.jsonl   # tools_on + tools_off
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from chatforge.checkpoint import load_run
from chatforge.device import pick_device
from chatforge.errors import ChatforgeError
from chatforge.eval.base import (
    EvalContext,
    EvalInputs,
    TaskResult,
    build_tasks,
    results_markdown,
    run_tasks,
    write_results,
)
from chatforge.options import EvalOptions


def default_tasks(inputs: EvalInputs) -> list[str]:
    """The tasks the given inputs make possible (used when no --tasks is given)."""
    names = []
    if inputs.bpb_files or inputs.world_dir:
        names.append("bpb")
    if inputs.world_dir:
        names += ["world_forward", "world_reverse"]
    if inputs.qa_files:
        names.append("qa")
    if inputs.mc_files:
        names.append("mc")
    if inputs.gsm8k_file:
        names.append("gsm8k")
    if inputs.tools_file:
        names.append("tools")
    return names


def evaluate(
    model_dir: str | Path,
    task_names: Sequence[str] | None = None,
    *,
    world_dir: str | Path | None = None,
    qa_file: str | Path | Sequence[str | Path] | None = None,
    people_ids: Sequence[int] | None = None,
    mc_files: Sequence[str | Path] = (),
    gsm8k_file: str | Path | None = None,
    bpb_files: Sequence[str | Path] = (),
    tools_file: str | Path | None = None,
    max_examples: int | None = None,
    max_new_tokens: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    device: str = "cpu",
    out_dir: str | Path | None = None,
    log=None,
    progress: bool = False,
) -> list[TaskResult]:
    """Evaluate the model in `model_dir` (a run or checkpoint folder) on `task_names`
    (default: every task the inputs allow); write eval.json / eval.md into out_dir if given."""
    if isinstance(qa_file, str | Path):
        qa_file = [qa_file]
    inputs = EvalInputs(
        world_dir=Path(world_dir) if world_dir is not None else None,
        qa_files=[Path(p) for p in qa_file or []],
        people_ids=list(people_ids) if people_ids is not None else None,
        mc_files=[Path(p) for p in mc_files],
        gsm8k_file=Path(gsm8k_file) if gsm8k_file is not None else None,
        bpb_files=[Path(p) for p in bpb_files],
        max_new_tokens=max_new_tokens,
        tools_file=Path(tools_file) if tools_file is not None else None,
    )
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ChatforgeError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    names = list(task_names) if task_names else default_tasks(inputs)
    if not names:
        raise ChatforgeError(
            "nothing to evaluate: give --tasks, or inputs such as --world DIR, --mc FILE, --gsm8k FILE, "
            "--tools-file FILE"
        )
    tasks = build_tasks(names, inputs)  # reads and checks every input before the model loads
    run = load_run(model_dir, inference=True, device=device)  # the layout chat and the server decode with
    model, meta, resolved = run.model, run.meta, run.folder
    ctx = EvalContext(model, run.tokenizer, device, max_examples, batch_size, seed, log, progress)
    results = run_tasks(ctx, tasks)
    if out_dir is not None:
        info = {"model": str(resolved), "stage": meta.get("stage"), "step": meta.get("step")}
        write_results(results, out_dir, {**info, "max_examples": max_examples, "seed": seed})
    return results


def _parse_ids(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ChatforgeError(f"--people must be comma-separated integers, got {text!r}") from None


def cmd_eval(args: EvalOptions) -> None:
    device = str(pick_device(args.device))
    results = evaluate(
        args.model,
        [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None,
        world_dir=args.world,
        qa_file=args.qa_file,
        people_ids=_parse_ids(args.people),
        mc_files=args.mc,
        gsm8k_file=args.gsm8k,
        bpb_files=args.bpb_file,
        tools_file=args.tools_file,
        max_examples=args.max_examples,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        seed=args.seed,
        device=device,
        out_dir=args.out,
        log=lambda line: print(line, file=sys.stderr, flush=True),
        progress=not args.no_progress,
    )
    print(results_markdown(results))
    if args.out:
        print(f"results written to {Path(args.out) / 'eval.json'} and eval.md")
