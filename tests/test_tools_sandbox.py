"""The python and chart tools: normal code works; every attack fails under each layer set; the host survives.

Layer sets: "all" (the default config), "kernel" (the audit hook off: Landlock, seccomp, rlimits and,
where they come, namespaces and the uid drop must hold alone), "hook" (no Landlock, no seccomp, no
namespaces, no uid drop: what `--unsafe-python` leaves, the audit hook alone, numpy refused).
The attacks are also run from a host started as root without CAP_SYS_ADMIN and as a non-root user
(`run_as`): each run is fully isolated or refused with one line, never quietly weaker.
"""

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from chatforge.errors import ChatforgeError
from chatforge.tools import sandbox
from chatforge.tools.builtin import default_registry
from chatforge.tools.chart import PNG_MAGIC
from chatforge.tools.sandbox import SandboxConfig, check_layers, layers_line, python_tool, run_python

REPO = Path(__file__).resolve().parents[1]
SMALL = SandboxConfig(wall_s=8, cpu_s=4, memory_mb=512, file_mb=1, max_procs=8, max_output_bytes=200_000)
NAMESPACE_LAYERS = {"network namespace", "pid namespace", "private /tmp", "uid 65534"}
HOOK_ONLY = replace(SMALL, isolate=False, drop_privileges=False, without=("landlock", "seccomp"), unsafe=True)


def required_on(layers: list[str]) -> bool:
    return any(x.startswith("landlock (ABI ") for x in layers) and "seccomp" in layers


@pytest.fixture(scope="module")
def kernel_ok() -> bool:
    """Whether this machine gives the required layers; if not, the refusal must be the one line."""
    r = check_layers(SMALL)
    if r.refused:
        assert "is missing" in r.refused and "\n" not in r.refused and r.stdout == ""
        return False
    assert required_on(r.layers), r.layers
    return True


@pytest.fixture
def runs(kernel_ok) -> None:
    if not kernel_ok:
        pytest.skip("this machine lacks Landlock or seccomp: the sandbox refuses (checked in kernel_ok)")


@pytest.fixture(params=["all", "kernel", "hook"])
def layers(request, kernel_ok) -> SandboxConfig:
    if request.param == "hook":
        return HOOK_ONLY
    if not kernel_ok:
        pytest.skip("this machine lacks Landlock or seccomp: the sandbox refuses (checked in kernel_ok)")
    return SMALL if request.param == "all" else replace(SMALL, audit_hooks=False)


def nobody_alive() -> list[str]:
    """Live (not zombie) processes of uid 65534: what a sandbox could have left behind."""
    pids = []
    for p in os.listdir("/proc"):
        try:
            if p.isdigit() and os.stat(f"/proc/{p}").st_uid == 65534:
                state = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[0]
                if state not in ("Z", "X"):
                    pids.append(p)
        except OSError:
            pass
    return pids


def test_normal_code_works_and_sees_its_files(tmp_path, runs):
    work = tmp_path / "files"
    r = run_python(
        "import os, numpy as np\n"
        "open('a.txt', 'w').write('hello')\n"
        "os.makedirs('sub', exist_ok=True)\n"
        "open('sub/b.txt', 'w').write(str(np.arange(4).sum()))\n"
        "print(sorted(os.listdir('.')))\n"
        "6 * 7",
        workdir=work,
        config=SMALL,
    )
    assert r.ok, r.stderr
    assert r.stdout == "['.sandbox', 'a.txt', 'sub']\n42\n"  # the final expression is echoed
    assert r.files == ["a.txt", "sub/b.txt"]
    assert (work / "a.txt").read_text() == "hello" and (work / "sub/b.txt").read_text() == "6"
    assert r.text() == "['.sandbox', 'a.txt', 'sub']\n42\n[files: a.txt, sub/b.txt]"
    assert required_on(r.layers) and {"rlimits", "audit hook"} <= set(r.layers)
    if os.geteuid() == 0 and "pid namespace" in r.layers:
        assert NAMESPACE_LAYERS <= set(r.layers)
    # a later call sees the folder; only what it changes is reported and copied back
    r = run_python(
        "import os, shutil\n"
        "print(open('a.txt').read())\n"
        "n = open('sub/b.txt', 'a').write('!')\n"
        "os.makedirs('scratch/deep')\n"
        "shutil.rmtree('scratch')",  # rmtree works with dir_fd-relative calls
        workdir=work,
        config=SMALL,
    )
    assert r.ok, r.stderr
    assert r.stdout == "hello\n" and r.files == ["sub/b.txt"]
    assert (work / "sub/b.txt").read_text() == "6!"
    # errors come back as a traceback of the code, and the registry's tool marks them
    res = python_tool("def f():\n    return 1 / 0\nf()", work, SMALL)
    assert res.error and "ZeroDivisionError" in res.content and 'File "<code>", line 2, in f' in res.content
    assert "sandbox_child" not in res.content


def test_network_to_a_host_listener_fails(layers):
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        srv.setblocking(False)
        port = srv.getsockname()[1]
        code = (
            "import socket\n"
            "for how in ('connect', 'create_connection'):\n"
            "    try:\n"
            "        if how == 'connect':\n"
            f"            socket.socket().connect(('127.0.0.1', {port}))\n"
            "        else:\n"
            f"            socket.create_connection(('localhost', {port}), timeout=2)\n"
            "        print('CONNECTED', how)\n"
            "    except OSError as e:\n"
            "        print('refused', how, e)\n"
        )
        r = run_python(code, config=layers)
        assert r.ok, r.stderr
        assert "CONNECTED" not in r.stdout and r.stdout.count("refused") == 2
        with pytest.raises(BlockingIOError):
            srv.accept()  # nothing ever reached the host


def test_writes_outside_the_folder_fail(layers, tmp_path):
    tag = uuid.uuid4().hex[:10]
    targets = [f"/tmp/sbx-{tag}", str(REPO / f"sbx-{tag}"), f"/var/tmp/sbx-{tag}", f"/dev/shm/sbx-{tag}"]
    code = (
        "import os, shutil, sqlite3\n"
        f"targets = {targets!r}\n"
        "attempts = [lambda t: open(t, 'w').write('x'), lambda t: os.mkdir(t),\n"
        "            lambda t: os.rename('mine.txt', t), lambda t: shutil.copy('mine.txt', t),\n"
        "            lambda t: sqlite3.connect(t).execute('create table x (y)')]\n"
        "open('mine.txt', 'w').write('mine')\n"
        "os.symlink('/tmp', 'tmplink')\n"
        f"attempts.append(lambda t: open('tmplink/sbx-{tag}-via-link', 'w').write('x'))\n"
        "ok = 0\n"
        "for t in targets:\n"
        "    for attempt in attempts:\n"
        "        try:\n"
        "            attempt(t)\n"
        "            ok += 1\n"
        "        except (OSError, sqlite3.Error):\n"
        "            pass\n"
        "print('succeeded inside the sandbox:', ok)\n"
    )
    try:
        r = run_python(code, workdir=tmp_path, config=layers)
        assert r.ok, r.stderr
        leaked = [t for t in [*targets, f"/tmp/sbx-{tag}-via-link"] if os.path.lexists(t)]
        assert leaked == []
        assert "succeeded inside the sandbox: 0" in r.stdout
        assert r.files == ["mine.txt"] and not (tmp_path / "tmplink").exists()  # links are not copied back
    finally:
        for t in [*targets, f"/tmp/sbx-{tag}-via-link"]:
            if os.path.isdir(t):
                os.rmdir(t)
            elif os.path.lexists(t):
                os.remove(t)


def test_fork_bomb_is_contained(layers):
    bomb = (
        "import os\n"
        "made = 0\n"
        "while True:\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            made = 0\n"
        "        else:\n"
        "            made += 1\n"
        "    except OSError as e:\n"
        "        if made == 0:\n"
        "            print('no fork:', e, flush=True)\n"
        "        made = -1\n"
    )
    t0 = time.monotonic()
    r = run_python(bomb, config=replace(layers, wall_s=1.0))
    assert time.monotonic() - t0 < 6
    if layers.audit_hooks:
        assert "no fork: sandbox: os.fork is not allowed" in r.stdout
    else:
        assert "no fork: [Errno 1] Operation not permitted" in r.stdout  # seccomp: threads only
    deadline = time.monotonic() + 2
    while nobody_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert nobody_alive() == []  # the pid namespace took every process with it


def test_subprocess_and_hook_bypasses_are_refused(kernel_ok):
    hook_only = HOOK_ONLY
    tag = uuid.uuid4().hex[:10]
    code = (
        "import builtins, sys\n"
        "def attempt(name, f):\n"
        "    try:\n"
        "        f()\n"
        "        print('ALLOWED', name)\n"
        "    except (OSError, ImportError) as e:\n"
        "        print('refused', name, type(e).__name__)\n"
        "import subprocess, os\n"
        "attempt('subprocess', lambda: subprocess.run(['true']))\n"
        "attempt('system', lambda: os.system('true'))\n"
        "attempt('execv', lambda: os.execv('/bin/true', ['true']))\n"
        "attempt('posix_spawn', lambda: os.posix_spawn('/bin/true', ['true'], {}))\n"
        "attempt('ctypes', lambda: __import__('ctypes'))\n"
        "def reimport():\n"
        "    del sys.modules['_posixsubprocess']\n"
        "    __import__('_posixsubprocess')\n"
        "attempt('_posixsubprocess', reimport)\n"
        "attempt('gc', lambda: __import__('gc').get_objects())\n"
        "attempt('settrace', lambda: sys.settrace(lambda *a: None))\n"
        "def hook_frame():\n"
        "    try:\n"
        "        open('/tmp/x', 'w')\n"
        "    except PermissionError as e:\n"
        "        e.__traceback__.tb_next.tb_frame\n"
        "attempt('hook frame', hook_frame)\n"
        "builtins.isinstance = lambda *a: True\n"  # patching what a naive hook would call
        "os.path.realpath = lambda p: os.getcwd() + '/ok'\n"
        f"attempt('write after patching', lambda: open('/tmp/sbx-{tag}', 'w'))\n"
    )
    try:
        for config in (SMALL, hook_only) if kernel_ok else (hook_only,):
            r = run_python(code, config=config)
            assert r.ok, r.stderr
            assert "ALLOWED" not in r.stdout and r.stdout.count("refused") == 10, r.stdout
            assert not os.path.exists(f"/tmp/sbx-{tag}")
    finally:
        if os.path.exists(f"/tmp/sbx-{tag}"):
            os.remove(f"/tmp/sbx-{tag}")


def test_resource_limits(runs):
    kernel = replace(SMALL, audit_hooks=False)
    r = run_python("x = bytearray(8 << 30)\nprint('ALLOCATED')", config=kernel)
    assert not r.ok and "MemoryError" in r.stderr and "ALLOCATED" not in r.stdout
    r = run_python("open('big', 'wb').write(b'x' * (2 << 20))", config=kernel)
    assert not r.ok and "File too large" in r.stderr
    t0 = time.monotonic()
    r = run_python("while True:\n    pass", config=replace(kernel, wall_s=1.0))
    assert r.killed == "time limit of 1 s" and time.monotonic() - t0 < 4
    r = run_python("while True:\n    print('x' * 10000)", config=kernel)
    assert r.killed == "output limit of 200,000 bytes" and r.output_bytes <= 200_000
    assert "characters cut" in r.text(1000) and len(r.text(1000)) < 1200
    r = run_python("while True:\n    pass", config=replace(kernel, cpu_s=1, wall_s=30))
    assert r.killed is None and r.exit_code == -9 and "CPU time limit" in r.text()  # RLIMIT_CPU, not the wall


def test_chart_returns_a_png(tmp_path, runs):
    reg = default_registry(tmp_path)
    assert reg.names() == ["calculator", "python", "chart"]
    res = reg.call("chart", {"code": "plt.bar(['a', 'b'], [3, 5]); plt.title('votes')"})
    assert not res.error, res.content
    assert res.content == "saved the chart as chart_001.png (640x480 PNG)"
    png = tmp_path / "chart_001.png"
    assert res.files == [str(png)]
    data = png.read_bytes()
    assert data.startswith(PNG_MAGIC) and struct.unpack(">II", data[16:24]) == (640, 480)
    assert len(data) > 5000  # a drawn chart, not an empty image


# ---- the attacks of the review, from a host started as each kind of user ----------------------------
HOST = """
import json, sys
from chatforge.tools.sandbox import SandboxConfig, run_python
cfg = SandboxConfig(wall_s=10, cpu_s=5, **json.loads(sys.argv[2]))
r = run_python(sys.argv[1], config=cfg)
print(json.dumps({"layers": r.layers, "refused": r.refused, "stdout": r.stdout, "stderr": r.stderr}))
"""
# as nobody: cover each folder others may not enter (e.g. /root, where pyenv puts Python) with an
# empty tmpfs and bind the paths the host needs back, in a mount namespace of this test alone
AS_NOBODY = """
set -e
mount --make-rprivate /
stage=$(mktemp -d)
i=0
for p in $KEEP; do mkdir "$stage/$i"; mount --bind "$p" "$stage/$i"; i=$((i+1)); done
for top in $COVER; do mount -t tmpfs -o mode=755 tmpfs "$top"; done
i=0
for p in $KEEP; do mkdir -p "$p"; mount --move "$stage/$i" "$p"; i=$((i+1)); done
exec setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps=-all "$@"
"""
IDENTITIES = ["as is", "root without CAP_SYS_ADMIN", "nobody"]


def _closed_ancestor(p: str) -> str | None:
    parts = Path(p).resolve().parts
    for i in range(2, len(parts) + 1):
        a = str(Path(*parts[:i]))
        if not os.stat(a).st_mode & 0o001:
            return a
    return None


def run_as(identity: str, code: str, **config) -> dict:
    """run_python(code) in a host process started as `identity`; the host must survive the code."""
    argv = [sys.executable, "-c", HOST, code, json.dumps(config)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if identity != "as is":
        if os.geteuid() != 0 or not shutil.which("setpriv"):
            pytest.skip(f"{identity}: needs root and setpriv to start the host so")
        if identity == "nobody":
            if not shutil.which("unshare"):
                pytest.skip("nobody: needs unshare to make the Python install readable to nobody")
            keep = {p for p in (sys.base_prefix, sys.prefix, str(REPO)) if _closed_ancestor(p)}
            env |= {
                "KEEP": " ".join(sorted(keep)),
                "COVER": " ".join(sorted({_closed_ancestor(p) for p in keep})),
            }
            argv = ["unshare", "--mount", "sh", "-c", AS_NOBODY, "sh", *argv]
        else:
            argv = ["setpriv", "--bounding-set=-sys_admin", "--inh-caps=-sys_admin", *argv]
    p = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, f"the host died ({p.returncode}): {p.stderr[-2000:]}"
    return json.loads(p.stdout.strip().splitlines()[-1])


ATTACKS = """
import os, signal, socket, sys
def attempt(name, f):
    try:
        f()
        print('ALLOWED', name, flush=True)
    except (OSError, ImportError) as e:
        print('refused', name, type(e).__name__, flush=True)
attempt('connect to the host', lambda: socket.create_connection(('127.0.0.1', {port}), timeout=2))
attempt('unix socket', lambda: socket.socket(socket.AF_UNIX).connect('/run/x.sock'))
attempt('write in /run/lock', lambda: open('/run/lock/sbx-{tag}', 'w').write('x'))
attempt('write in /tmp', lambda: open('/tmp/sbx-{tag}', 'w').write('x'))
attempt('write in the repository', lambda: open('{repo}/sbx-{tag}', 'w').write('x'))
attempt('mkfifo in /run/lock', lambda: os.mkfifo('/run/lock/sbx-{tag}-fifo'))
attempt('read /etc/shadow', lambda: open('/etc/shadow').read())
attempt('read the repository', lambda: open('{repo}/pyproject.toml').read())
attempt('pidfd kill of the parent', lambda: signal.pidfd_send_signal(os.pidfd_open(os.getppid()), signal.SIGKILL))
attempt('kill the parent', lambda: os.kill(os.getppid(), signal.SIGKILL) if os.getppid() else os.kill(12345678, 0))
def fork():
    if os.fork() == 0:
        os._exit(0)
attempt('fork', fork)
def raw_socket():  # ctypes: refused by the hook; past it, the system call itself is
    fd = __import__('ctypes').CDLL(None).socket(2, 1, 0)
    if fd < 0:
        raise OSError('no socket')
attempt('ctypes', raw_socket)
import numpy
print('numpy', numpy.arange(3).sum())
attempt('exec a shell', lambda: os.execv('/bin/sh', ['sh', '-c', 'echo ALLOWED exec a shell']))
"""


@pytest.mark.parametrize("identity", IDENTITIES)
@pytest.mark.parametrize("hook", [True, False], ids=["hook", "hook bypassed"])
def test_attacks_fail_or_the_sandbox_refuses(identity, hook):
    """The review's attacks 1-3 with the audit hook on and switched off (what the numpy raw-memory
    bypass achieves): only the kernel layers stand then, for root, root without CAP_SYS_ADMIN and nobody."""
    tag = uuid.uuid4().hex[:10]
    leaks = [f"/run/lock/sbx-{tag}", f"/run/lock/sbx-{tag}-fifo", f"/tmp/sbx-{tag}", str(REPO / f"sbx-{tag}")]
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        srv.setblocking(False)
        code = ATTACKS.format(port=srv.getsockname()[1], tag=tag, repo=REPO)
        try:
            r = run_as(identity, code, audit_hooks=hook)
        finally:
            leaked = [p for p in leaks if os.path.lexists(p)]
            for p in leaked:
                os.remove(p)
        with pytest.raises(BlockingIOError):
            srv.accept()  # nothing reached the host
    assert leaked == []
    if r["refused"]:  # the one line, and nothing ran
        assert "is missing" in r["refused"] and "\n" not in r["refused"] and r["stdout"] == ""
        return
    assert required_on(r["layers"]), r["layers"]
    assert "ALLOWED" not in r["stdout"], r["stdout"] + r["stderr"]
    assert r["stdout"].count("refused") == 13, r["stdout"] + r["stderr"]  # the exec's refusal included
    assert "numpy 3" in r["stdout"]  # normal code still works: isolated, not crippled


# ---- a missing layer: refused with one line, or run with --unsafe-python and a warning ---------------
@pytest.mark.parametrize("missing", ["landlock", "seccomp"])
def test_a_missing_layer_refuses_in_one_line(missing, tmp_path):
    r = run_python(
        "open('ran', 'w').write('x')\nprint('ran')",
        workdir=tmp_path,
        config=replace(SMALL, without=(missing,)),
    )
    name = {"landlock": "Landlock", "seccomp": "seccomp"}[missing]
    assert r.refused and f"{name} is missing" in r.refused and "\n" not in r.refused
    assert not r.ok and r.stdout == "" and not (tmp_path / "ran").exists() and r.files == []
    assert r.text() == f"[sandbox refused: {r.refused}]"
    assert python_tool("print(1)", tmp_path, replace(SMALL, without=(missing,))).error
    with pytest.raises(ChatforgeError, match=f"refuses to run code: {name} is missing.*--unsafe-python runs"):
        layers_line(replace(SMALL, without=(missing,)))
    # the explicit opt-in runs it, says so in the layers, and keeps raw memory out of reach
    unsafe = replace(SMALL, without=(missing,), unsafe=True)
    r = run_python("print('ran')\nimport numpy", config=unsafe)
    assert r.stdout == "ran\n" and "importing numpy is not allowed" in r.stderr
    assert any(x.startswith(f"UNSAFE: {name} is missing") for x in r.layers)
    line = layers_line(unsafe)
    assert line.startswith("python sandbox: ") and "WARNING: --unsafe-python" in line


def test_doctor_prints_the_layers(capsys, kernel_ok):
    from chatforge.cli import main

    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("python sandbox layers: rlimits")
    assert ("runs the model's code isolated" in out) == kernel_ok
    assert ("refuses to run code" in out) != kernel_ok


# ---- copy in and back: no links followed, no dot-names, caps on files and bytes ----------------------
def test_copy_back_never_follows_a_link(tmp_path, runs):
    work, outside = tmp_path / "files", tmp_path / "outside"
    work.mkdir()
    outside.mkdir()
    (work / "out").symlink_to(outside)  # a link in the files folder, to a folder outside it
    (work / "data.txt").symlink_to(tmp_path / "secret.txt")
    (tmp_path / "secret.txt").write_text("secret")
    r = run_python(
        "import os\nprint(sorted(os.listdir('.')))\nos.makedirs('out')\nopen('out/evil.txt', 'w').write('x')\n"
        "n = open('ok.txt', 'w').write('ok')",
        workdir=work,
        config=SMALL,
    )
    assert r.ok, r.stderr
    assert r.stdout == "['.sandbox']\n"  # links are not copied in
    assert list(outside.iterdir()) == [] and r.files == ["ok.txt"]
    assert "not copied in: data.txt (a symbolic link)" in r.text()
    assert "not copied back: out/evil.txt" in r.text()
    assert (work / "out").is_symlink() and (work / "ok.txt").read_text() == "ok"


def test_dot_folders_stay_out_both_ways(tmp_path, runs):
    work = tmp_path / "files"
    (work / ".git").mkdir(parents=True)
    (work / ".git" / "config").write_text("[core]\n")
    r = run_python(
        "import os\nprint(os.path.exists('.git'))\nos.makedirs('.git', exist_ok=True)\n"
        "open('.git/config', 'w').write('[core]\\n\\tfsmonitor = touch /tmp/pwned\\n')\n"
        "n = open('.bashrc', 'w').write('evil')",
        workdir=work,
        config=SMALL,
    )
    assert r.ok, r.stderr
    assert r.stdout == "False\n"
    assert (work / ".git" / "config").read_text() == "[core]\n" and not (work / ".bashrc").exists()
    assert "not copied in: .git/ (a dot-folder)" in r.text()
    assert "not copied back: .git/ (a dot-folder), .bashrc (a dot-file)" in r.text()


def test_many_files_are_refused_quickly(tmp_path, runs):
    work = tmp_path / "files"
    code = "import time\nt = time.monotonic()\nfor i in range(20000):\n    open(f'f{i}', 'w').close()\ntime.monotonic() - t"
    r = run_python(code, workdir=work, config=replace(SMALL, audit_hooks=False, cpu_s=30, wall_s=60))
    assert r.ok, r.stderr
    assert r.seconds - float(r.stdout) < 2  # the host's part; was 11 s, and every later call paid again
    assert r.files == [] and list(work.iterdir()) == []
    assert f"nothing copied back: the code left more than {sandbox.MAX_COPY_FILES:,} files" in r.text()
    for i in range(sandbox.MAX_COPY_FILES + 1):
        (work / f"f{i}").touch()
    r = run_python("print('ran')", workdir=work, config=SMALL)
    assert r.refused and r.refused.startswith(f"the files folder {work} holds more than") and r.stdout == ""


def test_unsafe_python_needs_tools():
    from chatforge.chat import chat_tools

    with pytest.raises(
        ChatforgeError, match="--unsafe-python is about the tools' python code: it needs --tools"
    ):
        chat_tools(None, None, True)


# The review's attack 1: numpy's __array_interface__ gives raw memory; from a refused call's
# traceback to the hook's frame (read as memory, not as the audited tb_frame), its function, whose
# code is replaced with a no-op. CPython 3.11-3.13 layouts.
NUMPY_BYPASS = """
import sys, types
import numpy as np

def mem(addr, n):
    class Raw:
        pass
    raw = Raw()
    raw.__array_interface__ = {"data": (addr, False), "shape": (n,), "typestr": "|u1", "version": 3}
    return np.asarray(raw)

def ptr(addr):
    return int.from_bytes(mem(addr, 8).tobytes(), "little")

def poke(addr, value):
    mem(addr, 8)[:] = np.frombuffer(value.to_bytes(8, "little"), np.uint8)

try:
    open("/nonexistent-dir/x", "w")
except PermissionError as e:
    tb = e.__traceback__
while tb.tb_next is not None:
    tb = tb.tb_next
frame = ptr(id(tb) + 24)                     # PyTracebackObject.tb_frame
iframe = ptr(frame + 24)                     # PyFrameObject.f_frame
func = ptr(iframe + (0 if sys.version_info < (3, 12) else 16))  # f_func / f_funcobj
assert ptr(func + 8) == id(types.FunctionType), "not a function"
noop = (lambda event, args: None).__code__
keep = [noop]
poke(id(noop), ptr(id(noop)) + 1)            # one more reference: the hook holds it now
poke(func + 48, id(noop))                    # PyFunctionObject.func_code
import ctypes                                # refused by the hook before
print("HOOK BYPASSED", flush=True)
"""


@pytest.mark.skipif(
    not (3, 11) <= sys.version_info[:2] <= (3, 13), reason="object layouts of CPython 3.11-3.13"
)
def test_numpy_raw_memory_bypass_meets_the_kernel_layers(runs):
    tag = uuid.uuid4().hex[:10]
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        srv.setblocking(False)
        after = (
            "import os, socket\n"
            "def attempt(name, f):\n"
            "    try:\n"
            "        f()\n"
            "        print('ALLOWED', name)\n"
            "    except OSError as e:\n"
            "        print('refused', name)\n"
            "def system():\n"
            "    if os.system('true') != 0:\n"
            "        raise OSError('no process')\n"
            f"attempt('connect', lambda: socket.create_connection(('127.0.0.1', {srv.getsockname()[1]}), timeout=2))\n"
            f"attempt('write in /run/lock', lambda: open('/run/lock/sbx-{tag}', 'w'))\n"
            "attempt('system', system)\n"
            "def raw_socket():\n"
            "    if ctypes.CDLL(None).socket(2, 1, 0) < 0:\n"
            "        raise OSError('no socket')\n"
            "attempt('socket through ctypes', raw_socket)\n"
        )
        try:
            r = run_python(NUMPY_BYPASS + after, config=SMALL)
            hook_only = run_python(NUMPY_BYPASS + after, config=HOOK_ONLY)
        finally:
            leaked = os.path.lexists(f"/run/lock/sbx-{tag}")
            if leaked:
                os.remove(f"/run/lock/sbx-{tag}")
        with pytest.raises(BlockingIOError):
            srv.accept()
    assert not leaked
    # the hook falls (as CPython says it may), the kernel layers hold
    assert r.stdout.startswith("HOOK BYPASSED\n"), r.stderr
    assert "ALLOWED" not in r.stdout and r.stdout.count("refused") == 4, r.stdout + r.stderr
    # without the kernel layers numpy is not there to start with
    assert hook_only.stdout == "" and "importing numpy is not allowed" in hook_only.stderr
