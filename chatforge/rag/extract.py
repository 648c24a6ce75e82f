"""Files -> blocks of plain text, each under the heading it sits in.

One reader per format (txt, md, rst, html, pdf, docx, jsonl), all returning `Block`s: a paragraph
(or a jsonl record, a pdf page's paragraph) with the heading path above it. Markup is dropped;
headings are kept apart so chunking can follow the document's structure. pypdf and python-docx are
imported only for their formats (the `rag` extra)."""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import PurePath

from chatforge.errors import ChatforgeError

INSTALL_HINT = 'pip install "chatforge[rag]"'
FORMATS = ("txt", "md", "rst", "html", "pdf", "docx", "jsonl")
_SUFFIXES = {
    ".txt": "txt", ".text": "txt", ".md": "md", ".markdown": "md", ".rst": "rst", ".html": "html",
    ".htm": "html", ".pdf": "pdf", ".docx": "docx", ".jsonl": "jsonl",
}  # fmt: skip


@dataclass(frozen=True)
class Block:
    heading: str  # "Title > Section > Subsection", "" before the first heading
    text: str
    record: int = 0  # a jsonl record's line: records are never chunked together


def file_format(name: str) -> str:
    """The format of a file name (`notes.rst.txt` is rst: Sphinx's copied sources end so)."""
    suffixes = [s.lower() for s in PurePath(name).suffixes]
    if len(suffixes) >= 2 and suffixes[-1] == ".txt" and suffixes[-2] in _SUFFIXES:
        return _SUFFIXES[suffixes[-2]]
    if suffixes and suffixes[-1] in _SUFFIXES:
        return _SUFFIXES[suffixes[-1]]
    raise ChatforgeError(
        f"{name}: unsupported file type {suffixes[-1] if suffixes else '(none)'}; "
        f"give one of {', '.join('.' + f for f in FORMATS)}"
    )


def extract(name: str, data: bytes) -> list[Block]:
    """The text blocks of a file's bytes, by the format its name says."""
    kind = file_format(name)
    if kind == "pdf":
        return _pdf(name, data)
    if kind == "docx":
        return _docx(name, data)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ChatforgeError(f"{name}: not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8") from None
    return {"txt": _plain, "md": _markdown, "rst": _rst, "html": _html, "jsonl": _jsonl}[kind](name, text)


def _paragraphs(text: str) -> list[str]:
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]


def _plain(name: str, text: str) -> list[Block]:
    return [Block("", p) for p in _paragraphs(text)]


class _Headings:
    """The heading path: setting level n drops everything below it."""

    def __init__(self) -> None:
        self.path: list[tuple[int, str]] = []

    def set(self, level: int, title: str) -> None:
        self.path = [(lv, t) for lv, t in self.path if lv < level] + [(level, title)]

    def __str__(self) -> str:
        return " > ".join(t for _, t in self.path)


def _blocks_with_headings(lines: list[tuple[int, str] | str]) -> list[Block]:
    """(level, title) items set the heading; string lines gather into paragraphs under it."""
    heads, out, para = _Headings(), [], []

    def flush() -> None:
        if para:
            out.extend(Block(str(heads), p) for p in _paragraphs("\n".join(para)))
            para.clear()

    for item in lines:
        if isinstance(item, tuple):
            flush()
            heads.set(*item)
        else:
            para.append(item)
    flush()
    return out


_MD_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_MD_INLINE = [
    (re.compile(r"!\[([^\]]*)\]\([^)]*\)"), r"\1"),  # images -> alt text
    (re.compile(r"\[([^\]]+)\]\([^)]*\)"), r"\1"),  # links -> their text
    (re.compile(r"(\*\*|__|`)"), ""),  # bold, code ticks
    (re.compile(r"^\s{0,3}(>|[-*+]|\d+\.)\s+"), ""),  # quotes, list markers
]


def _markdown(name: str, text: str) -> list[Block]:
    lines: list[tuple[int, str] | str] = []
    fenced = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            lines.append("")
            continue
        m = None if fenced else _MD_HEADING.match(line)
        if m:
            lines.append((len(m.group(1)), m.group(2)))
            continue
        for pattern, repl in ([] if fenced else _MD_INLINE):
            line = pattern.sub(repl, line)
        lines.append(line)
    return _blocks_with_headings(lines)


_RST_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+.:_])\1{2,}\s*$")
_RST_INLINE = [
    (re.compile(r":[\w:.-]+:`~?([^`<]*?)\s*(<[^>]*>)?`"), r"\1"),  # :func:`name <target>` -> name
    (re.compile(r"``([^`]*)``"), r"\1"),
    (re.compile(r"`([^`<]*?)\s*(<[^>]*>)?`_{0,2}"), r"\1"),  # `link <url>`_ -> link
    (re.compile(r"\*\*([^*]+)\*\*|\*([^*]+)\*"), lambda m: m.group(1) or m.group(2)),
    (re.compile(r"\|(\w[\w-]*)\|"), r"\1"),  # substitutions
    (re.compile(r"\\([^\w\s])"), r"\1"),  # escaped punctuation (a path's \Scripts stays)
]


def _rst(name: str, text: str) -> list[Block]:
    """Sections (title + underline, optionally overline; levels in order of first use), directive
    and comment lines dropped (their indented content kept), inline roles reduced to their text."""
    raw = text.splitlines()
    levels: list[str] = []
    lines: list[tuple[int, str] | str] = []
    i = 0
    while i < len(raw):
        line = raw[i]
        nxt = raw[i + 1] if i + 1 < len(raw) else ""
        over = _RST_UNDERLINE.match(line)
        if over and i + 2 < len(raw) and _RST_UNDERLINE.match(raw[i + 2]) and raw[i + 1].strip():
            style, title, i = "o" + line.strip()[0], raw[i + 1].strip(), i + 3  # overlined title
        elif line.strip() and not over and _RST_UNDERLINE.match(nxt) and len(nxt.strip()) >= len(line.strip()):
            style, title, i = nxt.strip()[0], line.strip(), i + 2
        else:
            stripped = line.strip()
            if stripped.startswith(".. "):  # a directive, target or comment: keep only an argument
                m = re.match(r"\.\. [\w:-]+::\s*(.*)", stripped)
                lines.append("" if m is None or stripped.startswith(".. _") else m.group(1))
            elif re.match(r":[\w -]+:(\s|$)", stripped):  # directive options (":maxdepth: 2"), not roles
                lines.append("")
            else:
                lines.append(line)
            i += 1
            continue
        if style not in levels:
            levels.append(style)
        lines.append((levels.index(style) + 1, _rst_inline(title)))
    return [Block(b.heading, _rst_inline(b.text)) for b in _blocks_with_headings(lines)]


def _rst_inline(text: str) -> str:
    """Roles, literals, links and emphasis reduced to their text (on whole paragraphs: a link's
    target often sits on the next line)."""
    for pattern, repl in _RST_INLINE:
        text = pattern.sub(repl, text)
    return text


class _HTMLText(HTMLParser):
    """Text of an HTML page: script/style dropped, block tags break paragraphs, h1-h6 are headings."""

    _BLOCK = {"p", "div", "br", "li", "ul", "ol", "table", "tr", "section", "article", "pre", "blockquote", "dd", "dt"}
    _SKIP = {"script", "style", "head", "title", "noscript", "template"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.lines: list[tuple[int, str] | str] = []
        self.skip = 0
        self.heading: int | None = None
        self.buf: list[str] = []

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag in self._SKIP:
            self.skip += 1
        elif re.fullmatch(r"h[1-6]", tag):
            self._flush()
            self.heading = int(tag[1])
        elif tag in self._BLOCK:
            self._flush()

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP:
            self.skip = max(0, self.skip - 1)
        elif re.fullmatch(r"h[1-6]", tag) and self.heading is not None:
            title = " ".join("".join(self.buf).split())
            self.buf, level, self.heading = [], self.heading, None
            if title:
                self.lines.append((level, title))
        elif tag in self._BLOCK:
            self._flush()

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self.buf.append(data)

    def _flush(self) -> None:
        if self.heading is None:
            self.lines += ["".join(self.buf), ""]
            self.buf = []


def _html(name: str, text: str) -> list[Block]:
    parser = _HTMLText()
    parser.feed(text)
    parser.close()
    parser._flush()
    return _blocks_with_headings(parser.lines)


def _jsonl(name: str, text: str) -> list[Block]:
    """One block per record: its "text" (or "content"), under its "title" (or "id") if it has one."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ChatforgeError(f"{name} line {n}: not valid JSON ({e.msg}); fix or remove the line") from None
        body = obj.get("text", obj.get("content")) if isinstance(obj, dict) else None
        if not isinstance(body, str):
            raise ChatforgeError(f'{name} line {n}: a record needs a "text" string field')
        title = obj.get("title", obj.get("id", ""))
        if body.strip():
            out.append(Block(str(title), " ".join(body.split()), record=n))
    return out


def _pdf(name: str, data: bytes) -> list[Block]:
    try:
        from pypdf import PdfReader
    except ImportError:
        raise ChatforgeError(f"{name}: reading PDF needs pypdf: {INSTALL_HINT}") from None

    try:
        reader = PdfReader(io.BytesIO(data))
        pages = [page.extract_text() or "" for page in reader.pages]
    except Exception as e:  # noqa: BLE001  (a damaged file can fail anywhere inside the parser)
        raise ChatforgeError(f"{name}: not a readable PDF ({type(e).__name__}: {e}); check the file") from None
    return [Block(f"page {i}", p) for i, page in enumerate(pages, 1) for p in _paragraphs(page)]


def _docx(name: str, data: bytes) -> list[Block]:
    try:
        import docx
    except ImportError:
        raise ChatforgeError(f"{name}: reading .docx needs python-docx: {INSTALL_HINT}") from None

    try:
        document = docx.Document(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001  (a damaged zip or XML can fail anywhere inside the parser)
        raise ChatforgeError(f"{name}: not a readable .docx ({type(e).__name__}); check the file") from None
    lines: list[tuple[int, str] | str] = []
    for para in document.paragraphs:
        style = para.style.name if para.style is not None else ""
        m = re.match(r"(?:Heading (\d)|Title)$", style)
        if m and para.text.strip():
            lines.append((int(m.group(1) or 0), para.text.strip()))
        else:
            lines += [para.text, ""]
    return _blocks_with_headings(lines)
