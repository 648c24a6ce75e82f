"""Who is calling: API keys -> users, and the Host header allow-list.

A server has no keys (it then listens on loopback only, and its one caller is the local user, who
sees everything), or some: the single-user shortcut (`--api-key-file FILE`, $CHATFORGE_API_KEY or
`--api-key`), whose holder is the admin, and a keys file (`--keys FILE`), one `USER:KEY` per line
(`USER:KEY:admin` for another admin; `#` starts a comment). Only SHA-256 digests of the keys are
kept in memory, and a key is compared with hmac.compare_digest against every entry, so neither the
time taken nor a memory dump gives a key away. A user sees only the conversations and ratings they
own; an admin sees all of them.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from chatforge.errors import ChatforgeError

MIN_KEY_CHARS = 16  # a guessable key is no key
USER_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
NEW_KEY_HINT = 'make one with: python -c "import secrets; print(secrets.token_urlsafe(24))"'


@dataclass(frozen=True)
class User:
    name: str
    admin: bool = False

    @property
    def owner(self) -> str | None:
        """The owner filter for the store: None (everything) for an admin."""
        return None if self.admin else self.name


LOCAL = User("local", admin=True)  # the caller of a server without keys (loopback only)
NOBODY = User("", admin=False)  # a caller without a key where none is needed (the page): owns nothing
USER_SCOPE_KEY = "chatforge.user"  # where middleware.Guard leaves the caller's User for the routes
ADMIN = "admin"  # the single-user shortcut's user name


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class Keys:
    """API key digests -> users."""

    def __init__(self) -> None:
        self.entries: list[tuple[bytes, User]] = []

    def copy(self) -> Keys:
        out = Keys()
        out.entries = list(self.entries)
        return out

    def __bool__(self) -> bool:
        return bool(self.entries)

    def add(self, key: str, user: User) -> None:
        digest = _digest(key)
        if any(hmac.compare_digest(d, digest) for d, _ in self.entries):
            raise ChatforgeError(f"the key of user {user.name} is also another user's key; give each its own")
        self.entries.append((digest, user))

    def lookup(self, key: str) -> User | None:
        """The key's user, or None. Every entry is compared, found or not."""
        digest, found = _digest(key), None
        for d, user in self.entries:
            if hmac.compare_digest(d, digest):
                found = user
        return found

    @property
    def users(self) -> list[str]:
        return sorted({u.name for _, u in self.entries})


def check_key(key: str, where: str) -> str:
    key = key.strip()
    if len(key) < MIN_KEY_CHARS or any(c.isspace() or c == ":" for c in key):
        raise ChatforgeError(
            f"{where}: an API key needs at least {MIN_KEY_CHARS} characters and no spaces or ':'; "
            + NEW_KEY_HINT
        )
    return key


def read_secret_file(path: str | Path, what: str) -> str:
    """A file that holds secrets: it must exist and not be readable by other users."""
    p = Path(path)
    try:
        mode = p.stat().st_mode
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ChatforgeError(f"cannot read the {what} {p} ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ChatforgeError(f"the {what} {p} is not UTF-8 text") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ChatforgeError(f"the {what} {p} is readable by other users; run: chmod 600 {p}")
    return text


def load_keys_file(path: str | Path, keys: Keys) -> None:
    """Add a keys file's `USER:KEY[:admin]` lines to `keys`."""
    text = read_secret_file(path, "keys file")
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):  # a comment is a whole line: a key may hold '#'
            continue
        parts = line.split(":")
        where = f"{path} line {n}"
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "admin"):
            raise ChatforgeError(f"{where}: expected USER:KEY or USER:KEY:admin")
        name, key = parts[0], parts[1]
        if not USER_NAME.fullmatch(name):
            raise ChatforgeError(f"{where}: a user name is 1-64 of A-Z a-z 0-9 _ . @ -, got {name!r}")
        if name in (ADMIN, LOCAL.name):  # they own the admin's and the keyless server's conversations
            raise ChatforgeError(f"{where}: the user names {ADMIN!r} and {LOCAL.name!r} are reserved; pick another")
        keys.add(check_key(key, where), User(name, admin=len(parts) == 3))
    if not keys:
        raise ChatforgeError(f"the keys file {path} holds no USER:KEY line")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts(host: str, extra: list[str]) -> list[str]:
    """The Host header values the server answers: loopback names, the address it listens on
    (and this machine's name when that is every interface), and what `--allowed-hosts` adds."""
    names = list(LOOPBACK_HOSTS)
    if host in ("0.0.0.0", "::"):
        names.append(os.uname().nodename)
    else:
        names.append(host.strip("[]"))
    for item in extra:
        names += [h.strip().lower() for h in item.split(",") if h.strip()]
    return list(dict.fromkeys(n.lower() for n in names))


def host_of(header: bytes) -> str:
    """The host name of a Host header, without its port ("[::1]:8000" -> "::1")."""
    value = header.decode("latin-1").strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value
