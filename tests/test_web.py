"""The chat page in headless Chromium: send a message, see the streamed answer, rate it down with a
correction (then it is in SQLite and in `chatforge feedback export`), stop an answer mid-stream,
reopen a stored conversation, and nothing from the model or the user can inject HTML or load
a remote image."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
import torch

CHROMIUM = "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip(
        "headless test needs Chromium at /usr/bin/chromium (apt-get install chromium)",
        allow_module_level=True,
    )
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the browser test needs `pip install playwright`"
)
uvicorn = pytest.importorskip("uvicorn")

from test_serve import serve  # noqa: E402  (uvicorn on a loopback port, in a thread)

from chatforge.chat_format import render_prompt  # noqa: E402
from chatforge.chat_format import turn_end_ids as stop_ids  # noqa: E402
from chatforge.cli import parse_command, run_command  # noqa: E402
from chatforge.engine import generate  # noqa: E402
from chatforge.model.gpt import GPT, GPTConfig  # noqa: E402
from chatforge.serve.app import create_app  # noqa: E402
from chatforge.serve.feedback import FeedbackStore  # noqa: E402
from chatforge.serve.scheduler import Job  # noqa: E402
from chatforge.tokenizer import Tokenizer  # noqa: E402

ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
LEAK = "<img src=http://x/leak> <script>window.pwned = 1</script>"
ALLOWED_TAGS = {"P", "BR", "STRONG", "EM", "CODE", "PRE", "UL", "OL", "LI", "A", "H3", "H4", "H5", "H6"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    tok = Tokenizer.train(["Hello there, how are you today? I am fine, thank you very much."] * 40, 300)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=300, seq_len=256, n_layer=2, n_embd=32, n_head=4, n_kv_head=2)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)
    store = FeedbackStore(tmp_path_factory.mktemp("web") / "fb.sqlite")
    app = create_app(model, tok, model_id="tiny", store=store, max_batch=4)
    with serve(app) as url, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page()
        requests: list[str] = []
        page.on("request", lambda r: requests.append(r.url))
        first = page.goto(url)
        page.set_default_timeout(15_000)
        page.wait_for_selector("body[data-ready='1']")
        page.click("#settings summary")  # open the settings (temperature, max tokens)
        yield {
            "url": url,
            "page": page,
            "requests": requests,
            "first": first,
            "store": store,
            "srv": app.state.server,
        }
        browser.close()
    store.close()


def export(db, fmt: str, out) -> list[dict]:
    run_command(*parse_command(["feedback", "export", "--db", db, "--as", fmt, "--out", out]))
    return [json.loads(line) for line in open(out, encoding="utf-8")]


def test_chat_rate_down_and_export(setup, tmp_path):
    page, store, srv = setup["page"], setup["store"], setup["srv"]
    assert "img-src 'self'" in setup["first"].headers["content-security-policy"]
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "8")
    question = "Hello there " + LEAK
    page.fill("#input", question)
    page.press("#input", "Enter")
    bubble = page.wait_for_selector(".msg.assistant[data-done='1']")

    # the user's message is shown as text, the answer streamed in and is what the model says
    assert page.inner_text(".msg.user .body") == question
    assert page.evaluate("window.pwned") is None and page.query_selector("#messages img") is None
    ref = list(
        generate(
            srv.model,
            render_prompt(srv.tok, [{"role": "user", "content": question}]),
            8,
            stop_ids=stop_ids(srv.tok),
        )
    )
    expected = srv.tok.decode([t for t in ref if t not in stop_ids(srv.tok)])
    (conv,) = store.list_conversations()
    stored = [m for m in store.get_conversation(conv["id"])["messages"] if m["role"] == "assistant"]
    assert [m["content"] for m in stored] == [expected] and expected.strip()
    assert bubble.inner_text().strip()

    # thumbs down, then a comment and a better answer
    with page.expect_response("**/v1/feedback"):
        bubble.query_selector("button.down").click()
    assert store.get_conversation(conv["id"])["messages"][-1]["rating"] == -1
    bubble.query_selector("textarea.comment").fill("gibberish")
    bubble.query_selector("textarea.correction").fill("Hello! How can I help?")
    with page.expect_response("**/v1/feedback") as r:
        bubble.query_selector("button[type=submit]").click()
    assert r.value.ok
    last = store.get_conversation(conv["id"])["messages"][-1]
    assert (last["rating"], last["comment"], last["correction"]) == (
        -1,
        "gibberish",
        "Hello! How can I help?",
    )
    assert "down" in page.inner_text("#conversations li") or page.query_selector("#conversations li.current")

    prefs = export(store.path, "prefs", tmp_path / "prefs.jsonl")
    assert prefs == [
        {
            "messages": [{"role": "user", "content": question}],
            "chosen": {"role": "assistant", "content": "Hello! How can I help?"},
            "rejected": {"role": "assistant", "content": expected},
        }
    ]
    sft = export(store.path, "sft", tmp_path / "sft.jsonl")
    assert sft[0]["messages"][-1] == {"role": "assistant", "content": "Hello! How can I help?"}


def test_stop_button_frees_the_row(setup):
    """Hold the scheduler (a helper job's callback blocks) once the page's answer is running, click
    Stop, and check that the server cancels the job; then let it go and see the row freed."""
    page, srv = setup["page"], setup["srv"]
    sched = srv.scheduler
    release, blocked = threading.Event(), threading.Event()
    helper = None

    def hold(kind, value):
        if kind != "token":
            return
        # The helper must still be running when the page's job arrives, however long the browser
        # takes to send it: its first token waits for the job to be queued (its 120 tokens alone
        # take a few milliseconds, less than the page's two requests).
        deadline = time.time() + 10
        while not sched.load()["waiting"] and not [j for j in sched.active if j is not helper]:
            if time.time() > deadline:
                return
            time.sleep(0.005)
        others = [j for j in sched.active if j is not helper]
        if others and others[0].generated >= 2:
            blocked.set()
            release.wait(10)

    page.click("#new-chat")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "")  # all the context: an answer that would run long
    helper = Job(prompt=[1, 2, 3], max_new_tokens=120, on_event=hold)
    sched.submit(helper)
    page.fill("#input", "Hello")
    page.press("#input", "Enter")
    assert blocked.wait(10)
    (job,) = [j for j in sched.active if j is not helper]
    page.wait_for_selector(".msg.assistant[data-id]")  # the stream has reached the page
    page.click("#stop")
    deadline = time.time() + 10
    while not job.cancelled.is_set():
        assert time.time() < deadline, "the server did not notice the stop"
        time.sleep(0.02)
    helper.cancel()
    release.set()
    page.wait_for_selector(".msg.assistant[data-done='1']")
    assert "stopped" in page.inner_text("#status")
    while sched.load()["active"]:
        assert time.time() < deadline + 5
        time.sleep(0.02)
    assert job.generated < job.budget


def test_stored_conversation_renders_safely(setup):
    page, url, requests = setup["page"], setup["url"], setup["requests"]
    history = [
        {"role": "user", "content": "show me"},
        {
            "role": "assistant",
            "content": f"**bold** {LEAK} ![x](http://x/leak2.png) [ok](https://example.com/a_b) "
            "[bad](javascript:alert(1))",
        },
        {"role": "user", "content": "thanks"},
    ]
    body = {"model": "tiny", "messages": history, "max_tokens": 3, "temperature": 0, "store": True}
    r = page.request.post(url + "/v1/chat/completions", data=body)
    assert r.ok, r.text()
    cid = r.json()["conversation_id"]
    page.reload()
    page.wait_for_selector("body[data-ready='1']")
    page.click("#settings summary")
    page.click(f"#conversations li[data-id='{cid}'] button.open")
    page.wait_for_selector(".msg.assistant strong")
    shown = page.inner_text("#messages")
    assert "<img src=http://x/leak>" in shown and "<script>" in shown
    assert page.query_selector("#messages img") is None and page.evaluate("window.pwned") is None
    link = page.query_selector(".msg.assistant a[href='https://example.com/a_b']")
    assert link is not None and "noopener" in link.get_attribute("rel")
    assert page.query_selector(".msg.assistant a[href^='javascript']") is None
    assert not [u for u in requests if "//x/" in u]  # nothing was fetched from the leak host


NASTY = [
    LEAK,
    "![a](http://x/leak.png)",
    '[x](javascript:alert(1)) [y](data:text/html,hi) [z](https://e.com/"onmouseover="alert(1))',
    '<a href="http://x">x</a> <iframe src=//x></iframe> <svg onload=alert(1)>',
    "**<b>bold</b>** *<i>it</i>* `<img src=x>` __u__",
    "```\n<script>alert(1)</script>\n```\n- <img src=x>\n1. [ok](https://ok.com/?a=1&b=<2>)",
    "# <h1>title</h1>\n\u0000 &amp; &lt;",
]


def test_markdown_renderer_is_safe(setup):
    page = setup["page"]
    # what it allows, it renders
    html = page.evaluate(
        "renderMarkdown", "**b** *i* `c<d>` [l](https://e.com/x_y_z)\n\n- one\n- two\n\n```\nx<y\n```"
    )
    assert "<strong>b</strong>" in html and "<em>i</em>" in html and "<code>c&lt;d&gt;</code>" in html
    assert '<a href="https://e.com/x_y_z" rel="noopener noreferrer nofollow" target="_blank">l</a>' in html
    assert "<ul><li>one</li><li>two</li></ul>" in html and "<pre><code>x&lt;y</code></pre>" in html
    # whatever the input, the parsed result holds only the renderer's own tags and attributes
    for src in NASTY:
        found = page.evaluate(
            """src => {
                const box = document.createElement("div");
                box.innerHTML = renderMarkdown(src);
                const attrs = e => [...e.attributes].map(a => [a.name, a.value]);
                return [...box.querySelectorAll("*")].map(e => [e.tagName, attrs(e)]);
            }""",
            src,
        )
        for tag, attrs in found:
            assert tag in ALLOWED_TAGS, (src, tag)
            for name, value in attrs:
                assert name in {"href", "rel", "target"}, (src, name)
                if name == "href":
                    assert value.startswith(("http://", "https://")), (src, value)
    assert page.evaluate("window.pwned") is None
