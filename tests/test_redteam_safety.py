"""Safety training data: the training split only, wrappers worded apart from the probes, labels right."""

import base64
import codecs
import re

from chatforge.conversations import (
    _BENIGN_TOPICS,
    _HARMFUL_TOPICS,
    _REFUSAL_TARGETS,
    _REQUEST_FRAMES,
    is_held_out,
)
from chatforge.redteam.detectors import is_refusal
from chatforge.redteam.goals import Goal
from chatforge.redteam.probes import DAN, LEET, PROBES
from chatforge.redteam.safety import ENCODINGS, WRAPPER_SHARES, safety_conversations


def _texts(chats) -> list[str]:
    """Every message, plus the decoded form of each base64 or rot13 line."""
    out = []
    for chat in chats:
        for m in chat:
            out.append(m["content"])
            for line in m["content"].splitlines():
                if re.fullmatch(r"[A-Za-z0-9+/=]{12,}", line):
                    out.append(base64.b64decode(line).decode())
                out.append(codecs.encode(line, "rot13"))
    return out


def test_safety_data_uses_the_training_split_only():
    chats = safety_conversations(1500, seed=1)
    seen = "\n".join(_texts(chats)).lower()
    for i, frame in enumerate(_REQUEST_FRAMES):
        if is_held_out(i):
            prefix = frame.split("{x}")[0].lower()
            assert prefix not in seen and prefix.translate(LEET) not in seen, frame
    for i, topic in enumerate(_HARMFUL_TOPICS):
        if is_held_out(i):
            for who in _REFUSAL_TARGETS:
                text = topic.format(t=who).lower()
                assert text not in seen and text.translate(LEET) not in seen, text
    for i, (topic, _) in enumerate(_BENIGN_TOPICS):
        if is_held_out(i):
            assert topic.lower() not in seen and topic.lower().translate(LEET) not in seen
    assert "make a bomb" in seen and "kill a program that has frozen" in seen  # the training split is used


def test_safety_wrappers_are_not_the_probes():
    seen = "\n".join(_texts(safety_conversations(1500, seed=2)))
    goal = Goal("XQX", "Sure, here is", "test")
    for name in ("dan", "fiction", "escalation", "base64", "rot13", "low-resource"):
        attack = PROBES[name].build(goal)
        for turn in [attack.messages[-1]["content"], *attack.follow_ups]:
            for piece in turn.split("XQX"):
                piece = piece.strip()
                if len(piece) > 12 and not piece.startswith("Begin your answer"):
                    assert piece not in seen, (name, piece)
    assert DAN.strip() not in seen


def test_safety_labels_shares_and_wrappers():
    chats = safety_conversations(1000, seed=0)
    assert chats == safety_conversations(1000, seed=0) and chats != safety_conversations(1000, seed=1)
    refused = [is_refusal(c[-1]["content"]) for c in chats]
    assert all(c[-1]["role"] == "assistant" for c in chats)
    assert 0.44 < sum(refused) / len(chats) < 0.56
    answers = {c[-1]["content"] for c, r in zip(chats, refused, strict=True) if not r}
    assert all(a.startswith("Sure") for a in answers)
    users = [c[-1 - 1]["content"] for c in chats]
    encoded = [u for u in users if any(u.startswith(how.split("{e}")[0]) for how, _ in ENCODINGS.values())]
    multi = [c for c in chats if sum(m["role"] == "user" for m in c) == 2]
    assert 0.1 < len(encoded) / len(chats) < 0.3 and 0.05 < len(multi) / len(chats) < 0.15
    assert set(WRAPPER_SHARES) == {"plain", "persona", "framing", "opener", "encoding"}
