"""Screenshots of the web page at desktop (1280x800) and phone (390x844) width, and of the compare
view, for docs/web.md.

    PYTHONPATH=. python bench/web_screenshots.py [--out docs/img]

A tiny random model serves the page (in this process, on a loopback port); the conversation shown is
written straight into the feedback store, so the picture shows what the page does with a real
answer (a table, a list, a quote, code with its copy button) rather than a random model's words.
Needs Chromium at /usr/bin/chromium and playwright, as tests/test_web.py does (and an emoji font,
e.g. Debian's fonts-noto-color-emoji, for the rating buttons to show)."""

from __future__ import annotations

import argparse
import socket
import tempfile
import threading
import time
from pathlib import Path

import torch
import uvicorn
from playwright.sync_api import sync_playwright

from chatforge.model.gpt import GPT, GPTConfig
from chatforge.serve.app import create_app
from chatforge.serve.command import uvicorn_config
from chatforge.serve.feedback import FeedbackStore
from chatforge.tokenizer import Tokenizer

CHROMIUM = "/usr/bin/chromium"
ANSWER = """Here are the three largest planets of the solar system:

| planet | diameter (km) | moons |
|---|---:|---:|
| Jupiter | 139,820 | 95 |
| Saturn | 116,460 | 146 |
| Uranus | 50,724 | 28 |

- **Jupiter** is a gas giant
  - its Great Red Spot is a storm larger than the Earth
- **Uranus** is an ice giant

> The numbers are NASA's fact sheet values.

To sort them in Python:

```python
planets = {"Jupiter": 139820, "Saturn": 116460, "Uranus": 50724}
print(sorted(planets, key=planets.get, reverse=True))
```"""
CONVERSATION = [
    {"role": "user", "content": "Which are the largest planets? Show a table."},
    {"role": "assistant", "content": ANSWER},
]


PAIR = {
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Paris is the capital of France."}},
        {"index": 1, "message": {"role": "assistant", "content": "France's capital is **Paris**, on the Seine, "
                                 "home to about 2.1 million people (and 12 million in its metropolitan area)."}},
    ]
}  # fmt: skip
DRAFT = {
    "model": "judge",
    "pick": "B",
    "p_a": 0.31,
    "critique": "Reply B is better because it answers and adds context.",
}


def compare_screenshot(browser, url: str, path: Path) -> None:
    """The compare view with a pair and a judge's draft. The two answers and the draft are canned
    (the random model's would be noise): the picture shows the view, not a model."""
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.route("**/v1/chat/completions", lambda route: route.fulfill(json=PAIR))
    page.route("**/v1/compare", lambda route: route.fulfill(json={"comparisons": True, "judge": "judge"}))
    page.route("**/v1/compare/judge", lambda route: route.fulfill(json=DRAFT))
    page.goto(url)
    page.wait_for_selector("body[data-ready='1']")
    page.click("#mode-compare")
    page.fill("#compare-prompt", "What is the capital of France?")
    page.click("#compare-ask")
    page.wait_for_selector("#judge-draft:not([hidden])")
    page.fill("#compare-comment", "B is right and says more")
    page.screenshot(path=str(path))
    print(path)
    page.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="docs/img", help="folder for web_desktop.png and web_phone.png")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    tok = Tokenizer.train([ANSWER] * 20, 400)
    model = GPT(GPTConfig(vocab_size=400, seq_len=512, n_layer=1, n_embd=32, n_head=4, n_kv_head=2)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        store = FeedbackStore(Path(tmp) / "fb.sqlite")
        for title in ("Sorting in Python", "A poem about the sea", "Which are the largest planets?"):
            cid = store.create_conversation(title=title, model="demo", source="web", owner="local")["id"]
        store.store_path(cid, CONVERSATION, owner="local")
        app = create_app(model, tok, model_id="demo", store=store, max_batch=2)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn_config(app))
        threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
        while not server.started:
            time.sleep(0.01)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox"])
                for name, size in (("web_desktop", (1280, 800)), ("web_phone", (390, 844))):
                    page = browser.new_page(viewport={"width": size[0], "height": size[1]})
                    page.goto(url)
                    page.wait_for_selector("body[data-ready='1']")
                    if page.is_visible("#menu"):  # the phone's sidebar slides in first
                        page.click("#menu")
                    page.click(f"#conversations li[data-id='{cid}'] button.open")
                    page.wait_for_selector(".msg.assistant table")
                    page.evaluate("document.querySelector('#messages').scrollTop = 0")
                    # the phone's sidebar has slid away again (a 0.2 s transition)
                    page.wait_for_function(
                        "() => document.querySelector('#sidebar').getBoundingClientRect().right <= 0 || innerWidth > 700"
                    )
                    page.screenshot(path=str(out / f"{name}.png"))
                    print(out / f"{name}.png")
                    page.close()
                compare_screenshot(browser, url, out / "web_compare.png")
                browser.close()
        finally:
            server.should_exit = True
            store.close()


if __name__ == "__main__":
    main()
