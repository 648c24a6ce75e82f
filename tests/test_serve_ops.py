"""The server's memory and operations: --max-model-len, the KV cache budget (jobs wait when it is
full, and still get engine.generate's tokens), /metrics, the access log, --log-level, and a port
already in use."""

from __future__ import annotations

import argparse
import logging
import socket
import threading

import pytest
import torch

pytest.importorskip("prometheus_client")
from fastapi.testclient import TestClient  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from test_serve import TEXTS, chat_ids, tiny_model  # noqa: E402

from chatforge.cli import main as cli_main  # noqa: E402
from chatforge.engine import generate, kv_bytes_per_token  # noqa: E402
from chatforge.errors import ChatforgeError  # noqa: E402
from chatforge.options import ServeOptions, add_options, options_from_args  # noqa: E402
from chatforge.serve.app import create_app  # noqa: E402
from chatforge.serve.auth import Keys, User  # noqa: E402
from chatforge.serve.command import bind_port, configure_logging, kv_cache_budget  # noqa: E402
from chatforge.serve.scheduler import Job, Scheduler  # noqa: E402
from chatforge.tokenizer import Tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models run faster on one thread

ADMIN_KEY, USER_KEY = "ops-admin-key-0123456789", "ops-alice-key-0123456789"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(TEXTS, 300)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def metric_values(text: str) -> dict[str, float]:
    """Every sample of a Prometheus exposition: name{labels} -> value."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


def test_jobs_wait_for_the_kv_budget_and_get_generates_tokens(model):
    """A budget that holds two jobs' reservations: five jobs queue, at most two run at once, the pool
    never holds more than the budget, and each job's tokens are engine.generate's."""
    g = torch.Generator().manual_seed(5)
    prompts = [
        torch.randint(0, 300, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g).tolist()
        for _ in range(5)
    ]
    sched = Scheduler(model, max_batch=4, max_queue=8, max_model_len=64, kv_cache_tokens=110)
    assert sched.max_model_len == 64 and sched.decoder.max_tokens == 110
    outs: list[list[int]] = [[] for _ in prompts]
    ended = threading.Semaphore(0)
    peaks = []
    step = sched.decoder.step

    def checked_step():
        peaks.append(sched.decoder.allocated_tokens)
        assert sched.decoder.reserved_tokens <= 110
        return step()

    sched.decoder.step = checked_step

    def on_event(i):
        def f(kind, value):
            if kind == "token":
                outs[i].append(value)
            else:
                assert (kind, value) == ("done", "length")
                ended.release()

        return f

    jobs = [Job(prompt=p, max_new_tokens=40, on_event=on_event(i)) for i, p in enumerate(prompts)]
    sched.submit(*jobs)  # all queued before the thread starts: the budget alone holds them back
    sched.start_thread()
    for _ in jobs:
        assert ended.acquire(timeout=30)
    sched.shutdown()
    assert sched.stats.max_rows == 2  # three rows would reserve 3 x (prompt + 39) > 110 tokens
    assert max(peaks) <= 110 and sched.decoder.allocated_tokens == 0
    for p, out in zip(prompts, outs, strict=True):
        assert out == list(generate(model, p, 40))
    m = metric_values(sched.metrics.exposition().decode())
    assert m["chatforge_generated_tokens_total"] == 5 * 40
    assert m["chatforge_time_to_first_token_seconds_count"] == 5
    assert m['chatforge_generations_total{finish_reason="length"}'] == 5
    assert m["chatforge_kv_cache_budget_tokens"] == 110 and m["chatforge_running_rows"] == 0


def test_max_model_len_caps_each_request(model, tok):
    app = create_app(model, tok, model_id="tiny", max_model_len=48)
    ids = chat_ids(tok, "Hello there")
    with TestClient(app, base_url="http://localhost") as c:
        assert c.get("/health").json()["context"] == 48
        r = c.post(
            "/v1/chat/completions",
            json={
                "model": "tiny",
                "messages": [{"role": "user", "content": "Hello there"}],
                "max_tokens": 49 - len(ids),
            },
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert "48" in r.json()["error"]["message"]
        r = c.post(
            "/v1/chat/completions",
            json={"model": "tiny", "messages": [{"role": "user", "content": "Hello there"}]},
        )
        usage = r.json()["usage"]
        assert r.status_code == 200 and usage["prompt_tokens"] + usage["completion_tokens"] <= 48
    with pytest.raises(ChatforgeError, match="max_model_len"):
        create_app(model, tok, model_id="tiny", max_model_len=model.cfg.seq_len + 1)
    with pytest.raises(ChatforgeError, match="cannot hold one request"):
        create_app(model, tok, model_id="tiny", max_model_len=64, kv_cache_tokens=63)


def test_metrics_need_an_admins_key_and_the_access_log_names_the_user(model, tok, caplog):
    keys = Keys()
    keys.add(ADMIN_KEY, User("root", admin=True))
    keys.add(USER_KEY, User("alice"))
    app = create_app(model, tok, model_id="tiny", keys=keys)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 5}
    with (
        TestClient(app, base_url="http://localhost") as c,
        caplog.at_level(logging.INFO, logger="chatforge.access"),
    ):
        assert (
            c.post(
                "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {USER_KEY}"}
            ).status_code
            == 200
        )
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers={"authorization": f"Bearer {USER_KEY}"}).status_code == 403
        assert (
            c.get(
                "/metrics", headers={"authorization": f"Bearer {ADMIN_KEY}", "host": "evil.example"}
            ).status_code
            == 400
        )
        r = c.get("/metrics", headers={"authorization": f"Bearer {ADMIN_KEY}"})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        c.get("/v1/models%0Aforged line", headers={"authorization": f"Bearer {USER_KEY}"})
    m = metric_values(r.text)
    assert (
        m["chatforge_generated_tokens_total"] >= 1 and m["chatforge_time_to_first_token_seconds_count"] == 1
    )
    assert m['chatforge_http_requests_total{code="200"}'] == 1  # the chat; /metrics counts once answered
    assert (
        m['chatforge_http_requests_total{code="401"}'] == 1
        and m['chatforge_http_requests_total{code="403"}'] == 1
    )
    for name in (
        "queue_length",
        "running_rows",
        "kv_cache_used_tokens",
        "kv_cache_allocated_tokens",
        "generated_tokens_per_second",
    ):
        assert f"chatforge_{name}" in m
    lines = [r.getMessage() for r in caplog.records if r.name == "chatforge.access"]
    assert len(lines) == 6
    assert '"POST /v1/chat/completions" 200' in lines[0] and lines[0].endswith("user=alice")
    assert lines[1].endswith('"GET /metrics" 401 ' + lines[1].split()[-2] + " user=-")
    assert lines[4].endswith("user=root") and all(k not in "".join(lines) for k in (ADMIN_KEY, USER_KEY))
    assert "\n" not in lines[5] and "\\x0a" in lines[5]  # a newline in a URL cannot forge a log line


def test_log_level_silences_the_access_log(model, tok, caplog):
    app = create_app(model, tok, model_id="tiny")
    before = logging.getLogger("chatforge").level
    try:
        configure_logging("warning")
        with TestClient(app, base_url="http://localhost") as c, caplog.at_level(logging.DEBUG):
            logging.getLogger("chatforge").setLevel(logging.WARNING)  # caplog lowered the root only
            assert c.get("/v1/models").status_code == 200
        assert not [r for r in caplog.records if r.name == "chatforge.access"]
        configure_logging("debug")
        caplog.clear()
        with (
            TestClient(app, base_url="http://localhost") as c,
            caplog.at_level(logging.DEBUG, logger="chatforge.access"),
        ):
            c.get("/v1/models")
        assert [r for r in caplog.records if r.name == "chatforge.access"]
    finally:
        logging.getLogger("chatforge").setLevel(before)


def test_a_port_in_use_is_one_line_and_nothing_says_serving(tmp_path, capsys):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        with pytest.raises(ChatforgeError, match=f"port {port} .*already in use.*--port"):
            bind_port("127.0.0.1", port)
        assert cli_main(["serve", "--model", str(tmp_path / "no-run"), "--port", str(port)]) == 2
    finally:
        holder.close()
    out, err = capsys.readouterr()
    assert "serving" not in out + err and err.count("\n") == 1 and str(port) in err


def test_context_flags_and_the_kv_budget(model):
    parser = argparse.ArgumentParser()
    add_options(parser, ServeOptions)
    for flags in (["-c", "128"], ["--ctx-size", "128"], ["--max-model-len", "128"]):
        assert (
            options_from_args(ServeOptions, parser.parse_args(["--model", "r", *flags])).max_model_len == 128
        )
    per_token = kv_bytes_per_token(model)
    assert kv_cache_budget(ServeOptions(model="r", kv_cache_mb=1), model) == (2**20 // per_token, None)
    assert kv_cache_budget(ServeOptions(model="r", kv_cache_tokens=300, kv_cache_mb=1), model) == (300, None)
    assert kv_cache_budget(ServeOptions(model="r", kv_cache_tokens=200, max_model_len=100), model) == (
        200,
        100,
    )
    assert kv_cache_budget(ServeOptions(model="r", kv_cache_tokens=100), model) == (100, 100)  # capped, said
    with pytest.raises(ChatforgeError, match="cannot hold one request"):
        kv_cache_budget(ServeOptions(model="r", kv_cache_tokens=99, max_model_len=100), model)
    with pytest.raises(ChatforgeError, match="max-model-len must be"):
        kv_cache_budget(ServeOptions(model="r", max_model_len=model.cfg.seq_len + 1), model)
