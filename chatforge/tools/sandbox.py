"""The `python` tool: run the model's code in a separate, limited process and return what it printed.

This is a teaching sandbox, not a container, but it fails closed: two kernel layers are REQUIRED,
and where either is missing the tool refuses to run code with one line that names it (`refused`),
unless the caller opts in with `unsafe=True` (`chatforge chat --unsafe-python`, loudly warned).
`chatforge doctor` shows what a machine gives. Every attack in tests/test_tools_sandbox.py is tried
against all layers together AND with the audit hook switched off (what a hook bypass achieves),
from hosts started as root, as root without CAP_SYS_ADMIN and as `nobody`. The layers:

- Landlock (required; Linux >= 5.13, no root needed): the code may read and write only in its
  own folder; read the interpreter, its libraries, /usr, /lib* and a few /etc files; execute only
  the interpreter. No write anywhere else (every world-writable folder included: /run/lock, /tmp),
  no read of /etc/shadow or the user's files even as root, no fifo or device node outside. From
  ABI 4 no TCP either; from ABI 6 no signal to a process outside the sandbox. `stat` of paths
  outside still works (Landlock does not cover it).
- seccomp (required; libseccomp2 through pyseccomp): system calls refused with EPERM: socket
  (all families; socketpair stays for asyncio), new processes (clone without CLONE_THREAD, fork,
  vfork; threads work), namespaces and mounts, ptrace, process_vm_*, pidfd_*, signals to any pid
  but its own, mknod/mkfifo, bpf, keyctl, io_uring, userfaultfd, perf_event_open, kernel modules,
  identity changes, raising rlimits, TIOCSTI. Other architectures' calls kill the process.
- rlimits (kernel): CPU seconds (SIGKILL at the limit), address space (a huge allocation gets a
  MemoryError), file size (EFBIG), open files, no core dumps, processes of the sandbox user.
- The host's reader: wall-clock limit (kills the process group, and the pid namespace with it),
  and at most `max_output_bytes` of stdout+stderr read before the child is killed.
- A fresh temp folder, copied in/out without following links (directory descriptors, O_NOFOLLOW),
  never a name that starts with a dot (.git, .bashrc: what other programs run), at most
  MAX_COPY_FILES files and MAX_COPY_BYTES bytes (past them: refused, or nothing copied back). What
  was left out is said in the result's `notes`. Deleting a file in the sandbox does not delete it
  in `workdir`.
- A scrubbed environment and `python -I -S -B`: no inherited secrets, no user site-packages.
- Extras where the machine gives them: as root with CAP_SYS_ADMIN, network, pid and mount
  namespaces (empty read-only tmpfs over /tmp, /var/tmp, /dev/shm) and the uid drop to `nobody`;
  as root without them, an empty capability bounding set (uid 0 with no capability); not root, an
  unprivileged user + network namespace.
- A Python audit hook (last layer, never the only one): refuses writes outside the folder,
  processes, sockets, ctypes/cffi, frame-walking tools, with clear messages. CPython documents that
  audit hooks are not a security boundary (numpy's raw memory defeats it), so when the kernel
  layers are missing (unsafe) nothing that hands out raw memory (numpy, matplotlib, mmap, ...) is
  importable.

`SandboxResult.layers` lists what applied; chat prints it before the model's code first runs.
"""

from __future__ import annotations

import json
import os
import pwd
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from chatforge.errors import ChatforgeError
from chatforge.tools.registry import ToolResult

CHILD = Path(__file__).with_name("sandbox_child.py")
PRIVATE = ".sandbox"  # TMPDIR and matplotlib's config folder, inside the sandbox folder; never listed
MAX_CODE_CHARS = 100_000
MAX_COPY_BYTES = 64 << 20  # at most this much is copied into and out of the sandbox per run
MAX_COPY_FILES = 1000  # and at most this many files: past either, the copy is refused
REQUIRED = ("landlock", "seccomp")  # the kernel layers without which code runs only with unsafe=True
HIDE = ["/tmp", "/var/tmp", "/dev/shm"]  # world-writable folders the mount namespace covers

SCHEMA = {
    "type": "object",
    "properties": {
        "code": {
            "type": "string",
            "description": "Python 3 source; the value of a final expression is printed, as in a REPL",
        }
    },
    "required": ["code"],
    "additionalProperties": False,
}
DESCRIPTION = (
    "Run Python code in a sandbox (no network, limited time and memory) and get back what it printed. "
    "Files written in the current folder are kept for later calls."
)


@dataclass(frozen=True)
class SandboxConfig:
    wall_s: float = 10.0  # wall-clock limit; the host kills the child at this point
    cpu_s: int = 10  # CPU seconds (RLIMIT_CPU)
    memory_mb: int = 1024  # address space (RLIMIT_AS): numpy + matplotlib need about 300 MB
    file_mb: int = 16  # largest file it may write (RLIMIT_FSIZE)
    max_procs: int = 16  # processes + threads of the sandbox user (RLIMIT_NPROC), all its sandboxes together
    open_files: int = 256
    max_output_bytes: int = 1 << 20  # stdout + stderr read from the child before it is killed
    shown_chars: int = 4000  # of each of stdout/stderr, in what the model sees
    isolate: bool = True  # namespaces and mounts, where the kernel allows
    drop_privileges: bool = True  # run as `user` when started as root
    audit_hooks: bool = True  # the in-process Python layer (tests switch it off to test the rest)
    user: str = "nobody"
    unsafe: bool = False  # run even without Landlock or seccomp (NOT isolated; `chat --unsafe-python`)
    without: tuple[str, ...] = ()  # required layers to leave off as if the kernel lacked them (tests)

    def check(self) -> None:
        bad = [
            f"{k}={getattr(self, k)!r}"
            for k in (
                "wall_s",
                "cpu_s",
                "memory_mb",
                "file_mb",
                "max_procs",
                "open_files",
                "max_output_bytes",
            )
            if not getattr(self, k) > 0
        ]
        if bad:
            raise ChatforgeError(f"sandbox limits must be > 0: {', '.join(bad)}")
        if unknown := set(self.without) - set(REQUIRED):
            raise ChatforgeError(f"without= takes {', '.join(REQUIRED)}; got {', '.join(sorted(unknown))}")


@dataclass
class SandboxResult:
    stdout: str
    stderr: str
    exit_code: int | None  # negative: killed by that signal; None: never started
    killed: str | None  # why the host killed it ("time limit of 10 s", "output limit ..."), else None
    files: list[str] = field(default_factory=list)  # created or changed, relative to the folder
    layers: list[str] = field(default_factory=list)  # the protections that were in place
    seconds: float = 0.0
    output_bytes: int = 0  # stdout + stderr bytes read
    refused: str | None = None  # why the code was not run at all (a missing layer, too many files)
    notes: list[str] = field(default_factory=list)  # files left out of the copies, and why

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.killed is None and self.refused is None

    def text(self, shown_chars: int = 4000) -> str:
        """What the model sees: stdout, then stderr, exit status, kill reason and new files."""
        if self.refused:
            return f"[sandbox refused: {self.refused}]"
        parts = []
        if self.stdout:
            parts.append(_clip(self.stdout, shown_chars))
        if self.stderr:
            parts.append("[stderr]\n" + _clip(self.stderr, shown_chars))
        if self.killed:
            parts.append(f"[killed: {self.killed}]")
        elif self.exit_code:
            parts.append(f"[exit status {self.exit_code}{_signal_note(self.exit_code)}]")
        if self.files:
            parts.append("[files: " + ", ".join(self.files) + "]")
        parts += [f"[{note}]" for note in self.notes]
        return "\n".join(p.rstrip("\n") for p in parts) if parts else "(no output)"


def _clip(s: str, n: int) -> str:
    """Head and tail of a long text (a traceback's last line matters most), with a note of the cut."""
    if len(s) <= n:
        return s
    head, tail = int(n * 0.6), n - int(n * 0.6)
    return f"{s[:head]}\n[... {len(s) - n:,} characters cut ...]\n{s[-tail:]}"


def _signal_note(code: int) -> str:
    if code >= 0:
        return ""
    name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
    why = " (the CPU time limit, or out of memory)" if -code == signal.SIGKILL else ""
    return f": killed by {name}{why}"


# ---- running code ----------------------------------------------------------------------------
def run_python(
    code: str,
    *,
    workdir: str | os.PathLike | None = None,
    config: SandboxConfig = SandboxConfig(),
    prelude: str = "",
    epilogue: str = "",
    echo: bool = True,
) -> SandboxResult:
    """Run `code` in the sandbox. `workdir` (created if missing) is the conversation's files folder:
    its files are copied in, and files the code creates or changes are copied back. `prelude` and
    `epilogue` run before/after the code in the same namespace (the chart tool saves the figure so).
    Raises ChatforgeError only for bad arguments; whatever the code does comes back in the result."""
    if not isinstance(code, str):
        raise ChatforgeError(f"code must be a string, got {type(code).__name__}")
    if len(code) > MAX_CODE_CHARS:
        raise ChatforgeError(f"the code is {len(code):,} characters; the limit is {MAX_CODE_CHARS:,}")
    if os.name != "posix":
        raise ChatforgeError("the python sandbox needs a POSIX system (Linux for its full isolation)")
    config.check()
    t0 = time.monotonic()
    box = Path(tempfile.mkdtemp(prefix="chatforge-sandbox-"))
    notes: list[str] = []
    try:
        (box / PRIVATE / "tmp").mkdir(parents=True)
        (box / PRIVATE / "mpl").mkdir()
        if workdir is not None:
            Path(workdir).mkdir(parents=True, exist_ok=True)
            if refused := _copy_in(Path(workdir), box, notes):
                return SandboxResult("", "", None, None, refused=refused, seconds=time.monotonic() - t0)
        before = _walk(box)
        uid, gid = _sandbox_ids(config)
        if uid is not None:
            for p in [box, *box.rglob("*")]:
                os.chown(p, uid, gid, follow_symlinks=False)
        result = _spawn(code, box, config, uid, gid, prelude, epilogue, echo)
        if workdir is not None and result.refused is None:
            result.files = _copy_back(box, Path(workdir), before, notes)
        result.notes = notes
    finally:
        shutil.rmtree(box, ignore_errors=True)
    result.seconds = time.monotonic() - t0
    return result


def python_tool(code: str, workdir: str | os.PathLike, config: SandboxConfig = SandboxConfig()) -> ToolResult:
    """The registry's `python` tool: run_python in `workdir`, its text for the model, error on failure."""
    r = run_python(code, workdir=workdir, config=config)
    return ToolResult(
        content=r.text(config.shown_chars), error=not r.ok, files=[str(Path(workdir) / f) for f in r.files]
    )


def _sandbox_ids(config: SandboxConfig) -> tuple[int | None, int | None]:
    if not (config.drop_privileges and os.geteuid() == 0):
        return None, None
    try:
        pw = pwd.getpwnam(config.user)
    except KeyError:
        raise ChatforgeError(
            f"no user {config.user!r} to run the sandbox as; create it or set user"
        ) from None
    return pw.pw_uid, pw.pw_gid


def refusal_line(result: SandboxResult) -> str:
    """The one line a person reads when the sandbox would not run code."""
    return (
        f"the python sandbox refuses to run code: {result.refused}. `chatforge doctor` shows the layers "
        "this machine gives; --unsafe-python runs code without them (NOT isolated)"
    )


def check_layers(config: SandboxConfig = SandboxConfig()) -> SandboxResult:
    """Start the sandbox once with nothing to run: which layers this machine gives (`.layers`), or
    why it refuses (`.refused`)."""
    return run_python("pass", config=config)


def layers_line(config: SandboxConfig = SandboxConfig()) -> str:
    """The sandbox's layers on this machine as one line to show a person before the model's code runs;
    ChatforgeError (the refusal line) when a required layer is missing and `config.unsafe` is off."""
    r = check_layers(config)
    if r.refused:
        raise ChatforgeError(refusal_line(r))
    if not r.ok:
        raise ChatforgeError(f"the python sandbox does not start here: {r.text()}")
    line = "python sandbox: " + ", ".join(r.layers)
    if any(layer.startswith("UNSAFE") for layer in r.layers):
        line += (
            "\nWARNING: --unsafe-python: the model's code runs WITHOUT kernel isolation; it can read what "
            "you can read, write where you can write and reach the network. Do not use it with untrusted models."
        )
    return line


def cmd_doctor(args) -> None:
    """`chatforge doctor`: the sandbox layers this machine gives and whether the python tool runs."""
    r = check_layers()
    print("python sandbox layers: " + (", ".join(r.layers) or "none"))
    if r.refused:
        print(refusal_line(r))
    elif not r.ok:
        print(f"the python tool does not start here: {r.text()}")
    else:
        print("the python tool runs the model's code isolated (Landlock and seccomp, the required layers, are on)")


def _needed_paths() -> list[str]:
    """What the sandbox user must be able to read: the interpreter, its libraries and this package."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, str(CHILD.parent)}
    paths.add(os.path.dirname(os.path.realpath(sys.executable)))
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        paths.add(sysconfig.get_paths()[key])
    if libdir := sysconfig.get_config_var("LIBDIR"):
        paths.add(libdir)
    return sorted(p for p in paths if p and os.path.isdir(p))


def _spawn(code, box: Path, config: SandboxConfig, uid, gid, prelude, epilogue, echo) -> SandboxResult:
    report_r, report_w = os.pipe()
    paths = sysconfig.get_paths()
    setup = {
        "workdir": str(box),
        "limits": {
            "cpu_s": config.cpu_s,
            "memory_bytes": config.memory_mb << 20,
            "file_bytes": config.file_mb << 20,
            "open_files": config.open_files,
            "max_procs": config.max_procs,
        },
        "isolate": config.isolate,
        "unsafe": config.unsafe,
        "without": list(config.without),
        "child": str(CHILD),
        "drop_privileges": uid is not None,
        "uid": uid,
        "gid": gid,
        "needed": _needed_paths(),
        "hide": HIDE,
        "report_fd": report_w,
        "run": {
            "workdir": str(box),
            "sys_path": sorted({paths["purelib"], paths["platlib"]}),
            "audit_hooks": config.audit_hooks,
            "report_fd": report_w,
        },
    }
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(box),
        "TMPDIR": str(box / PRIVATE / "tmp"),
        "MPLCONFIGDIR": str(box / PRIVATE / "mpl"),
        "MPLBACKEND": "Agg",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "OPENBLAS_NUM_THREADS": "1",  # threads count against max_procs
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    payload = json.dumps({"code": code, "prelude": prelude, "epilogue": epilogue, "echo": echo}).encode()
    argv = [sys.executable, "-I", "-S", "-B", str(CHILD), "setup", json.dumps(setup)]
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=box,
            pass_fds=(report_w,),
            start_new_session=True,  # its own process group, so the whole group can be killed
        )
    finally:
        os.close(report_w)
    try:
        out, err, killed = _communicate(proc, payload, config)
    finally:
        _kill_group(proc)
        proc.wait()
        layers, refused = _read_report(report_r)
    if refused is not None:
        return SandboxResult("", "", None, None, layers=layers, refused=refused)
    return SandboxResult(
        stdout=out.decode("utf-8", errors="replace"),
        stderr=err.decode("utf-8", errors="replace"),
        exit_code=proc.returncode,
        killed=killed,
        layers=layers,
        output_bytes=len(out) + len(err),
    )


def _communicate(
    proc: subprocess.Popen, payload: bytes, config: SandboxConfig
) -> tuple[bytes, bytes, str | None]:
    """Feed stdin, read stdout/stderr until EOF, the wall-clock limit or the output limit."""
    deadline = time.monotonic() + config.wall_s
    bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    total, killed, exited_at = 0, None, None
    sel = selectors.DefaultSelector()
    for f in (proc.stdout, proc.stderr):
        sel.register(f, selectors.EVENT_READ)
    os.set_blocking(proc.stdin.fileno(), False)
    sel.register(proc.stdin, selectors.EVENT_WRITE)
    pos = 0
    try:
        while sel.get_map():
            now = time.monotonic()
            if now >= deadline:
                killed = f"time limit of {config.wall_s:g} s"
                break
            if exited_at is None and _exited(proc.pid):
                exited_at = now
            if exited_at is not None and now - exited_at > 1.0:
                break  # the child is gone but something it left holds the pipes open
            for key, _ in sel.select(min(deadline - now, 0.25)):
                if key.fileobj is proc.stdin:
                    try:
                        pos += os.write(proc.stdin.fileno(), payload[pos : pos + 65536])
                    except BlockingIOError:
                        pass
                    except BrokenPipeError:  # it died before reading its code: stderr says why
                        pos = len(payload)
                    if pos >= len(payload):
                        sel.unregister(proc.stdin)
                        proc.stdin.close()
                    continue
                fd = key.fileobj.fileno()
                chunk = os.read(fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                room = config.max_output_bytes - total
                bufs[fd] += chunk[:room]
                total += min(len(chunk), room)
                if len(chunk) > room:
                    killed = f"output limit of {config.max_output_bytes:,} bytes"
                    break
            if killed:
                break
    finally:
        sel.close()
        if not proc.stdin.closed:
            proc.stdin.close()
    return bytes(bufs[proc.stdout.fileno()]), bytes(bufs[proc.stderr.fileno()]), killed


def _exited(pid: int) -> bool:
    """Whether the child has exited, without reaping it (so its pid, the group id, stays reserved)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM first: with a pid namespace, stage 1 then kills the namespace and reaps its pid 1
    (killing both at once would leave pid 1 a zombie for the host's init to reap); SIGKILL to the
    whole process group after that, or after half a second."""
    if not _exited(proc.pid):
        try:
            os.kill(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        end = time.monotonic() + 0.5
        while time.monotonic() < end and not _exited(proc.pid):
            time.sleep(0.005)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for f in (proc.stdout, proc.stderr):
        f.close()


def _read_report(fd: int) -> tuple[list[str], str | None]:
    os.set_blocking(fd, False)
    data = b""
    try:
        while chunk := os.read(fd, 65536):
            data += chunk
    except BlockingIOError:
        pass
    finally:
        os.close(fd)
    layers: list[str] = []
    refused = None
    for line in data.decode(errors="replace").splitlines():
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if isinstance(message, dict):
            layers += [str(x) for x in message.get("layers", [])]
            refused = str(message["refused"]) if message.get("refused") else refused
    return layers, refused


# ---- the folder: copy in, list, copy back ------------------------------------------------------
# Both walks go through directory descriptors and never follow a link (os.fwalk, O_NOFOLLOW), so a
# link in either folder, or one swapped in while copying, cannot lead a file outside. Names that
# start with a dot (.git, .bashrc, .envrc: things other programs run) are never copied either way.
class _TooMuch(Exception):
    pass


def _walk(root: Path, notes: list[str] | None = None) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of the regular, singly-linked files under root; what is left
    out is added to `notes` as (name, why). Raises _TooMuch past MAX_COPY_FILES or MAX_COPY_BYTES."""
    found: dict[str, tuple[int, int]] = {}
    total = 0
    for dirpath, dirnames, filenames, dfd in os.fwalk(root, follow_symlinks=False):
        rel_dir = os.path.relpath(dirpath, root)
        prefix = "" if rel_dir == "." else rel_dir + "/"
        for d in list(dirnames):
            if d.startswith("."):
                dirnames.remove(d)
                if notes is not None and prefix + d != PRIVATE:
                    notes.append((prefix + d + "/", "a dot-folder"))
        for name in filenames:
            st = os.lstat(name, dir_fd=dfd)
            why = None
            if name.startswith("."):
                why = "a dot-file"
            elif stat.S_ISLNK(st.st_mode):
                why = "a symbolic link"
            elif not stat.S_ISREG(st.st_mode):
                why = "not a regular file"
            elif st.st_nlink != 1:
                why = "a hard link"
            if why is not None:
                if notes is not None:
                    notes.append((prefix + name, why))
                continue
            total += st.st_size
            if len(found) >= MAX_COPY_FILES or total > MAX_COPY_BYTES:
                raise _TooMuch
            found[prefix + name] = (st.st_size, st.st_mtime_ns)
    return found


def _open_dir(root: Path, parts: list[str], create: bool) -> int:
    """A descriptor of root/parts..., opened one level at a time without following links."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts:
            if create:
                try:
                    os.mkdir(part, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_file(root: Path, rel: str) -> bytes | None:
    """The bytes of a regular, singly-linked file root/rel, or None if it is something else now."""
    *parts, name = rel.split("/")
    dfd = _open_dir(root, parts, create=False)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dfd)
    finally:
        os.close(dfd)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            return None
        return f.read(MAX_COPY_BYTES + 1)


def _write_file(root: Path, rel: str, data: bytes) -> None:
    """Write root/rel through a temp file renamed over it (a link there is replaced, never followed)."""
    *parts, name = rel.split("/")
    dfd = _open_dir(root, parts, create=True)
    tmp = f".{name}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=dfd)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dfd)
        except OSError:
            pass
        raise
    finally:
        os.close(dfd)


def _copy_in(workdir: Path, box: Path, notes: list[str]) -> str | None:
    """Copy workdir's files into the sandbox; a one-line refusal when there are too many."""
    left: list[tuple[str, str]] = []
    try:
        files = _walk(workdir, left)
    except _TooMuch:
        return (
            f"the files folder {workdir} holds more than {MAX_COPY_FILES:,} files or {MAX_COPY_BYTES >> 20} MiB; "
            "move some out (the sandbox copies the folder in on every call)"
        )
    for rel in files:
        try:
            data = _read_file(workdir, rel)
        except OSError as e:  # changed while copying (e.g. a folder became a link)
            left.append((rel, e.strerror or str(e)))
            continue
        if data is not None:
            _write_file(box, rel, data)
    if left:
        notes.append("not copied in: " + _listed(left))
    return None


def _copy_back(box: Path, workdir: Path, before: dict, notes: list[str]) -> list[str]:
    """Copy the files the code created or changed back to workdir; returns their relative paths."""
    left: list[tuple[str, str]] = []
    try:
        after = _walk(box, left)
    except _TooMuch:
        notes.append(
            f"nothing copied back: the code left more than {MAX_COPY_FILES:,} files or "
            f"{MAX_COPY_BYTES >> 20} MiB in the folder"
        )
        return []
    kept = []
    for rel in sorted(r for r, sig in after.items() if before.get(r) != sig):
        try:
            data = _read_file(box, rel)
            if data is None:
                continue
            _write_file(workdir, rel, data)
        except OSError as e:  # e.g. a folder of that name is a link in workdir
            left.append((rel, e.strerror or str(e)))
            continue
        kept.append(rel)
    if left:
        notes.append("not copied back: " + _listed(left))
    return kept


def _listed(items: list[tuple[str, str]], n: int = 5) -> str:
    shown = ", ".join(f"{name} ({why})" for name, why in items[:n])
    return shown + (f" and {len(items) - n:,} more" if len(items) > n else "")
