"""The chat page in headless Chromium: send a message, see the streamed answer, rate it down with a
correction (then it is in SQLite and in `chatforge feedback export`), stop an answer mid-stream,
reopen a stored conversation, and nothing from the model or the user can inject HTML or load
a remote image; Markdown (tables, quotes, nested lists, code with a copy button) through the
vendored markdown-it + DOMPurify; a full context trims the oldest turns instead of failing; the
sidebar folds away on a phone; the compare view appends a pick that `prefs` loads."""

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

from chatforge.align.label import Judge  # noqa: E402
from chatforge.align.prefs import load_prefs  # noqa: E402
from chatforge.chat_format import render_prompt  # noqa: E402
from chatforge.chat_format import turn_end_ids as stop_ids  # noqa: E402
from chatforge.checkpoint import save_model  # noqa: E402
from chatforge.cli import parse_command, run_command  # noqa: E402
from chatforge.engine import generate  # noqa: E402
from chatforge.errors import ChatforgeError  # noqa: E402
from chatforge.model.gpt import GPT, GPTConfig  # noqa: E402
from chatforge.options import ServeOptions  # noqa: E402
from chatforge.serve.app import create_app  # noqa: E402
from chatforge.serve.command import build_server_app  # noqa: E402
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
ALLOWED_TAGS = {"P", "BR", "STRONG", "EM", "S", "CODE", "PRE", "UL", "OL", "LI", "A", "H3", "H4", "H5", "H6"}
ALLOWED_TAGS |= {"BLOCKQUOTE", "TABLE", "THEAD", "TBODY", "TR", "TH", "TD", "HR"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    tok = Tokenizer.train(["Hello there, how are you today? I am fine, thank you very much."] * 40, 300)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=300, seq_len=256, n_layer=2, n_embd=32, n_head=4, n_kv_head=2)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)
    folder = tmp_path_factory.mktemp("web")
    store = FeedbackStore(folder / "fb.sqlite")
    torch.manual_seed(
        1
    )  # the compare view's judge: the same tokenizer, a context long enough for its question
    judge_model = GPT(GPTConfig(vocab_size=300, seq_len=1024, n_layer=1, n_embd=32, n_head=4, n_kv_head=2))
    judge = Judge(judge_model.eval(), tok, name="tiny-judge")
    comparisons = folder / "comparisons.jsonl"
    app = create_app(
        model, tok, model_id="tiny", store=store, max_batch=4, comparisons=comparisons, judge=judge
    )
    with serve(app) as url, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page()
        page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=url)
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
            "browser": browser,
            "comparisons": comparisons,
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

    # the comment form stays hidden until the answer is rated; thumbs down, then a comment and a better answer
    assert not bubble.query_selector("form").is_visible()
    with page.expect_response("**/v1/feedback"):
        bubble.query_selector("button.down").click()
    bubble.wait_for_selector("form", state="visible")
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


def rendered(page, src: str) -> list[list]:
    """renderMarkdown's output parsed by the browser: [tag, [[attribute, value], ...]] per element."""
    return page.evaluate(
        """src => {
            const box = document.createElement("div");
            box.innerHTML = renderMarkdown(src);
            const attrs = e => [...e.attributes].map(a => [a.name, a.value]);
            return [...box.querySelectorAll("*")].map(e => [e.tagName, attrs(e)]);
        }""",
        src,
    )


def test_markdown_renders_tables_quotes_nested_lists(setup):
    page = setup["page"]
    src = (
        "**b** *i* `c<d>` [l](https://e.com/x_y_z)\n\n"
        "| name | n |\n|---|---:|\n| a | 1 |\n| b | 2 |\n\n"
        "> quoted *words*\n\n"
        "- one\n  - one.a\n  - one.b\n- two\n\n"
        "1. first\n2. second\n\n"
        "```\nx<y\n```"
    )
    found = page.evaluate(
        """src => {
            const box = document.createElement("div");
            box.innerHTML = renderMarkdown(src);
            const q = s => [...box.querySelectorAll(s)].map(e => e.textContent.trim());
            return {
                strong: q("strong"), em: q(":scope > p em"), code: q(":scope > p code"), link: box.querySelector("a").outerHTML,
                cells: q("table tbody td"), heads: q("table thead th"), quote: q("blockquote em"),
                nested: q("ul > li > ul > li"), ordered: q("ol > li"), pre: q("pre code"),
            };
        }""",
        src,
    )
    assert found["strong"] == ["b"] and found["em"] == ["i"] and found["code"] == ["c<d>"]
    assert (
        found["link"]
        == '<a href="https://e.com/x_y_z" rel="noopener noreferrer nofollow" target="_blank">l</a>'
    )
    assert found["heads"] == ["name", "n"] and found["cells"] == ["a", "1", "b", "2"]
    assert found["quote"] == ["words"]
    assert found["nested"] == ["one.a", "one.b"] and found["ordered"] == ["first", "second"]
    assert found["pre"] == ["x<y"]


NASTY = [
    LEAK,
    "![a](http://x/leak.png)",
    "<img src=x onerror=window.pwned=1>",
    '[x](javascript:alert(1)) [y](data:text/html,hi) [z](https://e.com/"onmouseover="alert(1))',
    "[j](JaVaScRiPt:alert(1)) [k](  javascript:alert(1)) <a href=javascript:alert(1)>raw</a>",
    '<a href="http://x">x</a> <iframe src=//x></iframe> <svg onload=alert(1)>',
    "**<b>bold</b>** *<i>it</i>* `<img src=x>` __u__",
    "```\n<script>alert(1)</script>\n```\n- <img src=x>\n1. [ok](https://ok.com/?a=1&b=<2>)",
    "> <img src=x onerror=alert(1)>\n\n| a |\n|---|\n| <svg onload=alert(1)> |",
    "# <h1>title</h1>\n\u0000 &amp; &lt;",
]


def test_markdown_is_sanitised(setup):
    """Whatever the input, the parsed result holds only the allowed tags, links only to http(s),
    never an <img> or an event handler."""
    page = setup["page"]
    for src in NASTY:
        for tag, attrs in rendered(page, src):
            assert tag in ALLOWED_TAGS, (src, tag)
            for name, value in attrs:
                assert name in {"href", "rel", "target", "start"}, (src, name)
                if name == "href":
                    assert value.startswith(("http://", "https://")), (src, value)
    assert page.evaluate("window.pwned") is None
    # an image is a link to it, never loaded; a javascript: link stays text
    assert rendered(page, "![a](https://e.com/p.png)")[1][0] == "A"
    assert all(tag != "A" for tag, _ in rendered(page, "[x](javascript:alert(1))"))


def test_code_block_copy_button(setup):
    page, url = setup["page"], setup["url"]
    code = "print('hi')\nx = 1 < 2"
    history = [
        {"role": "user", "content": "code please"},
        {"role": "assistant", "content": f"```python\n{code}\n```"},
    ]
    history.append({"role": "user", "content": "thanks"})
    body = {"model": "tiny", "messages": history, "max_tokens": 2, "temperature": 0, "store": True}
    cid = page.request.post(url + "/v1/chat/completions", data=body).json()["conversation_id"]
    page.click("#new-chat")
    page.click(f"#conversations li[data-id='{cid}'] button.open")
    button = page.wait_for_selector(".msg.assistant pre button.copy")
    button.click()
    page.wait_for_function(
        "() => document.querySelector('.msg.assistant pre button.copy').textContent === 'Copied'"
    )
    assert page.evaluate("navigator.clipboard.readText()") == code


def long_history(turns: int) -> list[dict]:
    said = "Hello there, how are you today? I am fine, thank you very much. "
    history = []
    for i in range(turns):
        history += [{"role": "user", "content": f"{i} {said}"}, {"role": "assistant", "content": said * 2}]
    return history


def test_full_context_trims_the_oldest_turns(setup):
    """A conversation longer than the context: the page's next message is answered from the newest
    turns (the page says older ones were left out), an OpenAI client still gets the 400, and a
    message too long by itself leaves the history as it was."""
    page, url, srv, store = setup["page"], setup["url"], setup["srv"], setup["store"]
    history = long_history(8)
    system = {"role": "system", "content": "Be kind."}
    over = {
        "model": "tiny",
        "messages": [system, *history, {"role": "user", "content": "Hi"}],
        "max_tokens": 8,
    }
    r = page.request.post(url + "/v1/chat/completions", data=over)
    assert r.status == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = page.request.post(url + "/v1/chat/completions", data={**over, "trim_history": True})
    assert r.ok, r.text()
    left_out = r.json()["trimmed_messages"]
    assert left_out >= 2 and left_out % 2 == 0
    kept = [system, *over["messages"][1 + left_out :]]
    assert r.json()["usage"]["prompt_tokens"] == len(render_prompt(srv.tok, kept)) <= srv.ctx - 8
    one_more_turn = [system, *over["messages"][1 + left_out - 2 :]]  # as few left out as will do
    assert len(render_prompt(srv.tok, one_more_turn)) > srv.ctx - 8

    cid = store.create_conversation(title="long", model="tiny", source="web", owner="local")["id"]
    store.store_path(cid, [system, *history], owner="local")  # longer than the context: stored directly
    page.click("#new-chat")
    page.click(f"#conversations li[data-id='{cid}'] button.open")
    page.wait_for_function("() => document.querySelectorAll('.msg').length >= 15")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "8")
    for _ in range(2):  # the second message after the first trimmed one works too
        n = page.evaluate("document.querySelectorAll('.msg.assistant[data-done]').length")
        page.fill("#input", "Hello there")
        page.press("#input", "Enter")
        page.wait_for_function(f"() => document.querySelectorAll('.msg.assistant[data-done]').length > {n}")
        assert "older messages were left out" in page.inner_text("#status")
    assert page.query_selector_all(".msg.left-out")

    # a message too long alone: an error, and it is not added to the history (it goes back to the box)
    n = len(page.query_selector_all(".msg"))
    too_long = "zq" * 300
    page.fill("#input", too_long)
    page.press("#input", "Enter")
    page.wait_for_function("() => document.querySelector('#status').textContent.includes('context')")
    page.wait_for_function(f"() => document.querySelectorAll('.msg').length === {n}")
    assert page.input_value("#input") == too_long
    page.fill("#input", "")


def test_phone_layout_folds_the_sidebar(setup):
    browser, url = setup["browser"], setup["url"]
    for width, height in ((390, 844), (1280, 800)):
        page = browser.new_page(viewport={"width": width, "height": height})
        page.goto(url)
        page.wait_for_selector("body[data-ready='1']")
        side = page.query_selector("#sidebar").bounding_box()
        main = page.query_selector("main").bounding_box()
        if width == 390:
            assert side["x"] + side["width"] <= 0  # off screen until asked for
            assert main["width"] >= 370
            page.click("#menu")
            page.wait_for_function("() => document.querySelector('#sidebar').getBoundingClientRect().x >= 0")
            side = page.query_selector("#sidebar").bounding_box()
            assert side["width"] <= 0.9 * width and page.is_visible("#new-chat")
            page.click("#scrim", position={"x": width - 10, "y": 400})
            page.wait_for_function(
                "() => document.querySelector('#sidebar').getBoundingClientRect().right <= 0"
            )
        else:
            assert not page.is_visible("#menu") and side["x"] == 0 and side["width"] == 260
        page.close()


def test_compare_view_appends_a_pick_prefs_can_read(setup):
    page, path = setup["page"], setup["comparisons"]
    page.click("#new-chat")  # no system prompt: the compare view uses the chat's, if set
    page.fill("#temperature", "1")
    page.fill("#max-tokens", "6")
    page.click("#mode-compare")
    assert page.is_visible("#compare-view") and not page.is_visible("#chat-view")
    page.fill("#compare-prompt", "Hello there")
    page.click("#compare-ask")
    draft = page.wait_for_selector("#judge-draft:not([hidden])")
    assert "tiny-judge" in draft.inner_text()
    judge_pick = page.evaluate("compare.judge.pick")
    assert page.query_selector(f"#picks button.suggested[data-verdict='prefer_{judge_pick.lower()}']")
    a, b = page.evaluate("[compare.a, compare.b]")
    page.fill("#compare-comment", "B says more")
    page.click("#picks button[data-verdict='prefer_b']")
    page.wait_for_selector("#pair[data-saved='prefer_b']")
    assert "saved: 1 in the comparison file" in page.inner_text("#compare-status")
    (row,) = load_prefs(path)
    assert row["messages"] == [{"role": "user", "content": "Hello there"}]
    assert (row["chosen"]["content"], row["rejected"]["content"]) == (b, a)
    assert (row["verdict"], row["reason"], row["labeller"]) == ("prefer", "B says more", "web:local")
    assert row["judge"]["pick"] == judge_pick and row["judge"]["agrees"] == (judge_pick == "B")

    page.click("#compare-ask")  # a tie on a new pair: recorded, and not trainable
    page.wait_for_selector("#pair:not([data-saved]) #picks button:not([disabled])")
    page.click("#picks button[data-verdict='tie']")
    page.wait_for_selector("#pair[data-saved='tie']")
    assert [r["verdict"] for r in load_prefs(path)] == ["prefer", "tie"]
    assert len(load_prefs(path, trainable_only=True)) == 1
    page.click("#mode-chat")

    # bad picks are one-line 400s and leave the file alone
    pick = {"messages": [{"role": "user", "content": "hi"}], "a": "x", "b": "y", "verdict": "prefer_a"}
    for bad in (
        {**pick, "verdict": "maybe"},
        {**pick, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]},
        {**pick, "messages": [{"role": "wizard", "content": "hi"}]},
        {**pick, "judge": {"pick": "C", "p_a": 0.5, "critique": ""}},
    ):
        r = page.request.post(setup["url"] + "/v1/compare", data=bad)
        assert r.status == 400 and r.json()["error"]["message"], bad
    assert len(load_prefs(path)) == 2


def test_serve_options_give_the_compare_view_its_file_and_judge(setup, tmp_path):
    srv = setup["srv"]
    judge = GPT(GPTConfig(vocab_size=300, seq_len=1024, n_layer=1, n_embd=32, n_head=4, n_kv_head=2))
    save_model(tmp_path / "judge", judge, srv.tok.to_json(), {"stage": "test"})
    save_model(tmp_path / "run", srv.model, srv.tok.to_json(), {"stage": "test"})
    app, *_ = build_server_app(ServeOptions(model=str(tmp_path / "run"), judge=str(tmp_path / "judge")))
    cmp = app.state.compare
    assert cmp.path == (tmp_path / "run" / "comparisons.jsonl").resolve() and cmp.judge.name == "judge"
    (tmp_path / "picks").mkdir()
    with pytest.raises(ChatforgeError, match="is not a file"):
        build_server_app(ServeOptions(model=str(tmp_path / "run"), comparisons=str(tmp_path / "picks")))
    with pytest.raises(ChatforgeError, match="context"):  # a judge too short for its question
        build_server_app(ServeOptions(model=str(tmp_path / "run"), judge=str(tmp_path / "run")))
