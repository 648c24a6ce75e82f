"""Text from a model or a tool, made safe to print on a terminal.

A terminal obeys control sequences inside the text it prints: OSC 52 writes the clipboard, OSC 0
sets the window title, CSI moves the cursor or clears the screen, DCS/APC reach terminal extensions,
a bare carriage return overwrites the line. Text that came from a model or a tool is untrusted, so
every place that prints it goes through `strip_controls` (whole text) or `ControlStripper`
(streamed pieces). What is removed: C0 controls except newline and tab (carriage return included),
DEL, C1 controls (U+0080-U+009F, the 8-bit forms of ESC sequences), and whole ESC sequences:
CSI (ESC [ ... final), OSC/DCS/SOS/PM/APC strings (ESC ] P X ^ _ ... up to BEL or ST) and
the short ones (ESC intermediates final). Chatforge's own prompts and notes are printed as they are.

A stripped text contains no control character at all, so no sequence can survive; matching whole
sequences only keeps their payload (a clipboard's base64, a title) off the screen. A string
sequence longer than MAX_SEQUENCE characters, or one never terminated, loses only its introducer:
its payload then prints as plain, harmless text.
"""

from __future__ import annotations

import re

MAX_SEQUENCE = 1024  # characters of one sequence's body; also the most a stream holds back

_N = MAX_SEQUENCE
_STRING_INTRO = r"(?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f])"  # OSC, DCS, SOS, PM, APC (7- and 8-bit)
_CSI_INTRO = r"(?:\x1b\[|\x9b)"
# every control character that is removed: C0 but \t and \n, DEL, C1
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# one whole sequence, or else a single control character; every alternative starts with a control
_SEQUENCE = re.compile(
    rf"{_STRING_INTRO}[^\x07\x1b\x9c]{{0,{_N}}}(?:\x07|\x1b\\|\x9c)"
    rf"|{_CSI_INTRO}[0-?]{{0,{_N}}}[ -/]{{0,{_N}}}[@-~]"
    rf"|\x1b[ -/]{{0,{_N}}}[0-~]"
    r"|[\x00-\x08\x0b-\x1f\x7f-\x9f]"
)
# the text from a control character to the end is an unfinished sequence: more text could complete it
_UNFINISHED = re.compile(
    rf"{_STRING_INTRO}[^\x07\x1b\x9c]{{0,{_N}}}\x1b?"
    rf"|{_CSI_INTRO}[0-?]{{0,{_N}}}[ -/]{{0,{_N}}}"
    rf"|\x1b[ -/]{{0,{_N}}}"
)


def strip_controls(text: str) -> str:
    """`text` without control characters and escape sequences (newlines and tabs kept)."""
    return _SEQUENCE.sub("", text)


def escape_controls(text: str) -> str:
    """Control characters shown as \\xNN instead of removed: for a person judging the text itself
    (the labeller), who should see that a bell or an escape was there."""
    return "".join(c if c.isprintable() or c in "\n\t" else f"\\x{ord(c):02x}" for c in text)


class ControlStripper:
    """`strip_controls` for a stream: `push(piece)` returns what can be shown now and holds back an
    unfinished sequence at the piece's end (so an ESC in one piece and its `]52;...` in the next are
    removed together); `end()` returns the rest. The pieces shown equal `strip_controls` of the whole."""

    def __init__(self) -> None:
        self.held = ""

    def push(self, piece: str) -> str:
        text, self.held = self.held + piece, ""
        shown, pos = [], 0
        while (m := _CONTROL.search(text, pos)) is not None:
            start = m.start()
            shown.append(text[pos:start])
            if _UNFINISHED.fullmatch(text, start):
                self.held = text[start:]
                break
            pos = _SEQUENCE.match(text, start).end()
        else:
            shown.append(text[pos:])
        return "".join(shown)

    def end(self) -> str:
        rest, self.held = strip_controls(self.held), ""
        return rest
