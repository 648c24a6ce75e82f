"""The `chatforge` command line: help for every sub-command, the presets table, one clean line on
stderr (exit 2) for each kind of bad input, and world -> tokenizer -> data -> pretrain as a chain."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from chatforge.cli import COMMANDS, build_parser, main, parse_command
from chatforge.config import PRESETS, RLConfig, get_preset, prefs_config, training_config
from chatforge.data.sources import iter_documents
from chatforge.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = ["--preset", "smoke", "--no-progress", "--set", "eval_every=0", "--set", "log_every=1"]


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()  # drop anything printed before
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, *fragments: str) -> None:
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("chatforge: error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


# ---- help and presets -----------------------------------------------------------------------

SUBCOMMANDS = [[]] + [
    [verb, *([action] if action else [])]
    for verb, entry in COMMANDS.items()
    for action in ([None, *entry] if isinstance(entry, dict) else [None])
]


@pytest.mark.parametrize("words", SUBCOMMANDS, ids=lambda w: " ".join(w) or "chatforge")
def test_help_of_every_subcommand_exits_zero(capsys, words):
    with pytest.raises(SystemExit) as exc:
        main([*words, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: chatforge {' '.join(words)}".rstrip())
    assert "--help" in out


def _options_of(parser, words=("chatforge",)):
    """(command words, the option's names, its help) for every option of every sub-command."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options_of(sub, (*words, name))
        elif not isinstance(action, argparse._HelpAction | argparse._VersionAction):
            yield " ".join(words), action.option_strings or [action.dest], action.help


def test_every_option_of_every_subcommand_has_help():
    options = list(_options_of(build_parser()))
    assert len(options) > 150  # the walk reached every sub-command
    missing = [
        f"{words} {names[-1]}"
        for words, names, text in options
        if not text or text == argparse.SUPPRESS or len(text.split()) < 2
    ]
    assert not missing, f"options without a help text: {missing}"


def test_version_is_the_package_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"chatforge {version('chatforge')}"


def test_the_classic_verbs_are_all_there():
    for words in (["world"], ["tokenizer", "train"], ["tokenizer", "eval"], ["data"], ["pretrain"], ["speedrun"],
                  ["presets"], ["sft"], ["merge"], ["report"], ["import"], ["export"], ["eval"], ["chat"],
                  ["prefs", "reward"], ["prefs", "dpo"], ["prefs", "label"], ["prefs", "world"],
                  ["prefs", "winrate"], ["rl"], ["serve"], ["feedback", "list"], ["feedback", "export"]):  # fmt: skip
        assert words in SUBCOMMANDS, words


@pytest.mark.parametrize("words", [[], ["serve"], ["rl"], ["chat"], ["eval"], ["prefs", "dpo"]], ids=str)
def test_help_imports_neither_torch_nor_fastapi(cli_env, words):
    code = (
        "import sys\nfrom chatforge.cli import main\n"
        f"try:\n    main({[*words, '--help']!r})\nexcept SystemExit:\n    pass\n"
        "heavy = sorted(m for m in ('torch', 'fastapi', 'numpy', 'tokenizers') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=cli_env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout, proc.stdout[-300:]


def test_every_handler_exists_and_takes_its_options():
    """Each "module:function" a verb names resolves (imported here, as the verb would)."""
    import importlib

    for entry in COMMANDS.values():
        for command in entry.values() if isinstance(entry, dict) else [entry]:
            module, function = command.handler.split(":")
            assert callable(getattr(importlib.import_module(module), function)), command.handler


def test_flags_come_from_the_options_fields():
    from chatforge.options import ChatOptions, EvalOptions, FeedbackExportOptions, parse

    opts = parse(ChatOptions, ["--model", "r", "-p", "hi", "--tools", "--top-k", 5])
    assert (opts.model, opts.prompt, opts.tools, opts.top_k, opts.max_calls) == ("r", "hi", "all", 5, 4)
    assert parse(ChatOptions, ["--model", "r", "--tools", "calculator"]).tools == "calculator"
    opts = parse(EvalOptions, ["--model", "r", "--qa-file", "a", "--qa-file", "b", "--mc", "x", "y"])
    assert opts.qa_file == ["a", "b"] and opts.mc == ["x", "y"] and opts.bpb_file == []
    assert parse(FeedbackExportOptions, ["--db", "d", "--as", "sft", "--out", "o"]).fmt == "sft"
    with pytest.raises(SystemExit):  # required flags are required
        parse(ChatOptions, [])


def test_preset_and_set_work_the_same_on_every_training_command(tmp_path):
    """pretrain, sft, prefs reward / dpo and rl each build their preset section, then --set, then their
    own flags (conveniences for --set, generated from the config's fields)."""
    base = ["--model", "m", "--data", "d", "--out", "o"]
    _, opts = parse_command(["prefs", "dpo", *base, "--set", "warmup_steps=0", "--steps", 7, "--lr", 0.01,
                             "--batch-size", 3, "--lora-rank", 4])  # fmt: skip
    cfg = training_config(opts.preset, "prefs", opts.settings, opts.overrides)
    assert cfg == prefs_config(
        warmup_steps=0, max_steps=7, lr=0.01, embed_lr=0.01, device_batch_size=3, lora_rank=4
    )
    _, opts = parse_command(["prefs", "reward", *base, "--preset", "smoke", "--set", "max_steps=9"])
    assert training_config(opts.preset, "prefs", opts.settings, opts.overrides).max_steps == 9
    _, opts = parse_command(["sft", *base, "--preset", "smoke", "--lora-rank", 8, "--set", "lr=1e-4"])
    cfg = training_config(opts.preset, "sft", opts.settings, opts.overrides)
    assert cfg.lora_rank == 8 and cfg.lr == 1e-4 and cfg.max_steps == get_preset("smoke").sft.max_steps
    rl = ["rl", "--model", "m", "--problems", "world", "--out", "o"]
    _, opts = parse_command([*rl, "--steps", 3, "--top-p", 0.9, "--set", "kl_beta=0.1"])
    assert training_config(opts.preset, "rl", opts.settings, opts.overrides) == RLConfig(
        steps=3, top_p=0.9, kl_beta=0.1
    )
    _, opts = parse_command([*rl, "--preset", "cpu", "--tools"])
    assert training_config(opts.preset, "rl", opts.settings, opts.overrides) == get_preset("cpu").rl
    _, opts = parse_command(["pretrain", "--set", "max_steps=5"])
    assert training_config(opts.preset, "pretrain", opts.settings, opts.overrides).max_steps == 5


def expected_params(cfg: dict) -> int:
    """Parameters of the Llama-style GPT, counted by hand from its shapes (no biases, no qk-norm)."""
    d, hd, inter = cfg["n_embd"], cfg["n_embd"] // cfg["n_head"], cfg["intermediate_size"]
    per_layer = 2 * d * d + 2 * d * cfg["n_kv_head"] * hd + 3 * d * inter + 2 * d
    embeddings = cfg["vocab_size"] * d * (1 if cfg["tie_embeddings"] else 2)
    return embeddings + cfg["n_layer"] * per_layer + d


def test_presets_lists_all_four_with_their_plans(capsys):
    from chatforge.model.gpt import GPTConfig

    rc, out, err = run_cli(capsys, "presets")
    assert rc == 0 and err == ""
    blocks = dict(re.findall(r"^== (\w+): .*?\n(.*?)(?=^== |\Z)", out, flags=re.S | re.M))
    assert list(blocks) == ["smoke", "cpu", "d12", "d20"] == list(PRESETS)
    for name, block in blocks.items():
        preset = PRESETS[name]
        t = preset.pretrain
        cfg = GPTConfig.from_depth(
            t.depth, vocab_size=preset.vocab_size, seq_len=t.seq_len, overrides=t.model
        )
        assert cfg.qk_norm is False
        n = expected_params(cfg.to_dict())
        assert f"params: {n / 1e6:.2f}M" in block, (name, n, block)
        assert f"{cfg.n_layer} layers x {cfg.n_embd} wide" in block
        assert f"vocab {preset.vocab_size}, context {t.seq_len}" in block
        assert "GiB per device" in block and "FLOPs" in block
    # the GPU recipes are the sizes they claim to be
    assert 100e6 < expected_params(_model("d12")) < 140e6
    assert 400e6 < expected_params(_model("d20")) < 700e6

    rc, out, _ = run_cli(capsys, "presets", "d12")
    assert rc == 0 and out.count("== ") == 1 and out.startswith("== d12:")


def _model(name: str) -> dict:
    from chatforge.model.gpt import GPTConfig

    p = PRESETS[name]
    return GPTConfig.from_depth(
        p.pretrain.depth, vocab_size=p.vocab_size, seq_len=p.pretrain.seq_len
    ).to_dict()


def test_pretrain_dry_run_prints_the_plan_and_trains_nothing(capsys, tmp_path):
    rc, out, err = run_cli(capsys, "pretrain", "--dry-run", "--preset", "d20", "--out", tmp_path / "r")
    assert rc == 0, err
    assert f"params: {expected_params(_model('d20')) / 1e6:.2f}M" in out
    assert not (tmp_path / "r").exists()


def test_pretrain_dry_run_plans_for_the_datas_vocabulary(capsys, smoke, tmp_path):
    data_vocab = json.loads((smoke.data / "index.json").read_text())["vocab_size"]
    assert data_vocab != get_preset("d20").vocab_size
    rc, out, err = run_cli(capsys, "pretrain", "--dry-run", "--preset", "d20", "--data", smoke.data)
    assert rc == 0, err
    assert f"vocab {data_vocab}," in out
    rc, out, err = run_cli(capsys, "pretrain", "--dry-run", "--preset", "d20", "--data", smoke.data,
                           "--vocab-size", 1000)  # fmt: skip
    assert rc == 0 and "vocab 1000," in out  # the explicit size wins
    rc, out, err = run_cli(capsys, "pretrain", "--dry-run", "--data", tmp_path / "nope")
    assert_one_line_error(rc, err, "no index.json")


# ---- one line on stderr for bad input -------------------------------------------------------


@pytest.fixture(scope="module")
def other_tokenizers(smoke, tmp_path_factory) -> dict[str, Path]:
    """A smaller tokenizer, and one of the same size trained on other text: neither made the shards."""
    root = tmp_path_factory.mktemp("other_tok")
    docs = list(iter_documents(smoke.world))
    small = Tokenizer.train(docs, 300).save(root / "small.json")
    same = Tokenizer.train(docs[: len(docs) // 3], 512)
    assert same.vocab_size == 512 and same.to_json() != Tokenizer.load(smoke.tokenizer).to_json()
    return {"small": small, "same_size": same.save(root / "same.json")}


BAD_INPUT = {
    "data: missing source": (
        lambda s, t: ["data", "--source", t / "nope", "--tokenizer", s.tokenizer, "--out", t / "d"],
        ["no such file or folder", "nope"],
    ),
    "data: missing tokenizer": (
        lambda s, t: ["data", "--source", s.world, "--tokenizer", t / "nope.json", "--out", t / "d"],
        ["no tokenizer at"],
    ),
    "tokenizer train: missing source": (
        lambda s, t: ["tokenizer", "train", "--source", t / "nope", "--out", t / "t.json"],
        ["no such file or folder"],
    ),
    "tokenizer eval: missing ref": (
        lambda s, t: [
            "tokenizer",
            "eval",
            "--tokenizer",
            s.tokenizer,
            "--source",
            s.world,
            "--ref",
            t / "nope",
        ],
        ["no reference tokenizer"],
    ),
    "pretrain: missing data": (
        lambda s, t: ["pretrain", "--data", t / "nope", "--out", t / "r", *TINY],
        ["no index.json", "chatforge data"],
    ),
    "pretrain: no --data": (lambda s, t: ["pretrain", "--out", t / "r", *TINY], ["needs --data"]),
    "data: empty corpus": (
        lambda s, t: ["data", "--source", t / "empty.txt", "--tokenizer", s.tokenizer, "--out", t / "d"],
        ["corpus empty"],
    ),
    "tokenizer train: empty corpus": (
        lambda s, t: ["tokenizer", "train", "--source", t / "empty.txt", "--out", t / "t.json"],
        ["corpus is empty"],
    ),
    "tokenizer train: vocab too small": (
        lambda s, t: ["tokenizer", "train", "--source", s.world, "--vocab-size", "10", "--out", t / "t.json"],
        ["vocab_size 10 is too small", "264"],
    ),
    "pretrain: unknown preset": (
        lambda s, t: ["pretrain", "--data", s.data, "--out", t / "r", "--preset", "huge"],
        ["unknown preset 'huge'", "smoke, cpu, d12, d20"],
    ),
    "speedrun: unknown preset": (
        lambda s, t: ["speedrun", "--out", t / "r", "--preset", "huge"],
        ["unknown preset 'huge'"],
    ),
    "set: unknown field": (
        lambda s, t: ["pretrain", "--data", s.data, "--out", t / "r", *TINY, "--set", "max_stepz=3"],
        ["no field 'max_stepz'"],
    ),
    "set: wrong type": (
        lambda s, t: ["pretrain", "--data", s.data, "--out", t / "r", *TINY, "--set", "max_steps=lots"],
        ["max_steps=lots", "max_steps takes a"],
    ),
    "set: bool": (
        lambda s, t: ["pretrain", "--data", s.data, "--out", t / "r", *TINY, "--set", "compile=1"],
        ["true or false"],
    ),
    "set: no value": (
        lambda s, t: ["pretrain", "--data", s.data, "--out", t / "r", *TINY, "--set", "max_steps"],
        ["expected field=value"],
    ),
    "set: unknown section": (
        lambda s, t: ["pretrain", "--data", s.data, "--out", t / "r", *TINY, "--set", "optim.lr=1"],
        ["no section 'optim'"],
    ),
    "set: bad optimizer": (
        lambda s, t: ["pretrain", "--data", s.data, "--out", t / "r", *TINY, "--set", "optimizer=sgd"],
        ["unknown optimizer 'sgd'"],
    ),
    "set: batch not a multiple": (
        lambda s, t: [
            "pretrain",
            "--data",
            s.data,
            "--out",
            t / "r",
            *TINY,
            "--set",
            "total_batch_tokens=1000",
        ],
        ["total_batch_tokens 1000 is not a multiple"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_on_stderr(capsys, smoke, tmp_path, case):
    (tmp_path / "empty.txt").write_text("")
    build, fragments = BAD_INPUT[case]
    rc, _, err = run_cli(capsys, *build(smoke, tmp_path))
    assert_one_line_error(rc, err, *fragments)
    assert not (tmp_path / "r" / "model.safetensors").exists()


@pytest.mark.parametrize("which", ["small", "same_size"])
def test_tokenizer_that_did_not_make_the_shards_is_refused(capsys, smoke, tmp_path, other_tokenizers, which):
    tok = other_tokenizers[which]
    rc, _, err = run_cli(
        capsys, "pretrain", "--data", smoke.data, "--tokenizer", tok, "--out", tmp_path / "r", *TINY
    )
    assert_one_line_error(rc, err, "chatforge data")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("damage", ["model.safetensors", "train_state.pt", "config.json"])
def test_corrupt_checkpoint_on_resume_is_one_line(capsys, smoke, tmp_path, damage):
    run = tmp_path / "r"
    args = ["pretrain", "--data", smoke.data, "--out", run, *TINY, "--set", "ckpt_every=1"]
    rc, _, err = run_cli(capsys, *args, "--set", "max_steps=2")
    assert rc == 0, err
    latest = run / "ckpt" / "step_000002"
    path = latest / damage
    path.write_bytes(path.read_bytes()[:40])
    rc, _, err = run_cli(capsys, *args, "--set", "max_steps=4", "--resume")
    assert_one_line_error(rc, err, "corrupt", damage)
    # without --resume the folder is refused too, and nothing is overwritten
    rc, _, err = run_cli(capsys, *args, "--set", "max_steps=4")
    assert_one_line_error(rc, err, "already has checkpoints", "--resume")
    assert len(path.read_bytes()) == 40


def test_error_from_a_subprocess_is_one_line_without_traceback(tmp_path, cli_env, cli_cmd):
    proc = subprocess.run(
        cli_cmd("pretrain", "--data", "/nonexistent", "--out", tmp_path / "r"),
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("chatforge: error: ") and "/nonexistent" in lines[0]
    assert not (tmp_path / "r").exists()


# ---- the stages chained through the CLI --------------------------------------------------------


def test_world_tokenizer_data_pretrain_chain(capsys, smoke, tmp_path):
    world, tok, data, run = tmp_path / "world", tmp_path / "tok.json", tmp_path / "data", tmp_path / "run"

    rc, out, err = run_cli(
        capsys, "world", "--out", world, "--people", 40, "--heldout", 4, "--paraphrases", 2
    )
    assert rc == 0, err
    assert (world / "manifest.json").is_file() and f"world written to {world}" in out
    manifest = json.loads((world / "manifest.json").read_text())
    assert manifest["n_people"] == 40 and manifest["n_heldout"] == 4

    rc, out, err = run_cli(capsys, "tokenizer", "train", "--source", world, "--vocab-size", 400, "--out", tok)
    assert rc == 0, err
    assert Tokenizer.load(tok).vocab_size == 400

    rc, out, err = run_cli(
        capsys, "tokenizer", "eval", "--tokenizer", tok, "--source", world, "--ref", smoke.tokenizer
    )
    assert rc == 0, err
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ")]
    table = {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}
    assert table["chatforge"][0] == "400" and table[smoke.tokenizer.name][0] == "512"
    assert all(float(cells[1]) > 1.0 for cells in table.values())  # bytes per token
    # the larger vocabulary needs fewer tokens for the same text
    assert int(table[smoke.tokenizer.name][2].replace(",", "")) < int(table["chatforge"][2].replace(",", ""))

    rc, out, err = run_cli(capsys, "data", "--source", world, "--tokenizer", tok, "--out", data)
    assert rc == 0, err
    index = json.loads((data / "index.json").read_text())
    assert index["vocab_size"] == 400 and index["splits"]["train"]["tokens"] > 0
    assert (data / "tokenizer.json").read_bytes() == tok.read_bytes()

    sets = ["--set", "max_steps=6", "--set", "ckpt_every=3", "--set", "eval_every=3"]
    rc, out, err = run_cli(capsys, "pretrain", "--data", data, "--out", run, *TINY, *sets)
    assert rc == 0, err
    summary = json.loads(out[out.index("{\n") :])  # the summary is the last thing printed
    assert summary["steps"] == 6 and summary["params"] > 0
    assert summary == {
        **json.loads((run / "pretrain_summary.json").read_text()),
        "loss_plot": summary["loss_plot"],
    }
    for name in ("model.safetensors", "config.json", "tokenizer.json", "metrics.jsonl", "loss.png"):
        assert (run / name).is_file(), name
    assert (run / "tokenizer.json").read_text() == Tokenizer.load(tok).to_json()
    assert [p.name for p in sorted((run / "ckpt").iterdir())] == ["step_000003", "step_000006"]

    # the same command again with --resume finds the finished run and changes nothing
    before = (run / "model.safetensors").read_bytes()
    rc, out, err = run_cli(capsys, "pretrain", "--data", data, "--out", run, *TINY, *sets, "--resume")
    assert rc == 0, err
    assert "resuming from" in out and (run / "model.safetensors").read_bytes() == before
    shutil.rmtree(run)
