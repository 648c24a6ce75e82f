"""The python and chart tools: normal code works; every attack fails under each layer set; the host survives.

Layer sets: "all" (the default config), "kernel" (the audit hook off: rlimits, namespaces, uid drop
must hold alone; needs root), "hook" (no namespaces and no uid drop: the audit hook must hold alone).
"""

import os
import socket
import struct
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from chatforge.tools.builtin import default_registry
from chatforge.tools.chart import PNG_MAGIC
from chatforge.tools.sandbox import SandboxConfig, python_tool, run_python

REPO = Path(__file__).resolve().parents[1]
SMALL = SandboxConfig(wall_s=8, cpu_s=4, memory_mb=512, file_mb=1, max_procs=8, max_output_bytes=200_000)
KERNEL_LAYERS = {"network namespace", "pid namespace", "private /tmp", "uid 65534"}


@pytest.fixture(scope="module")
def kernel_ok() -> bool:
    return KERNEL_LAYERS <= set(run_python("pass", config=SMALL).layers)


@pytest.fixture(params=["all", "kernel", "hook"])
def layers(request, kernel_ok) -> SandboxConfig:
    if request.param == "all":
        return SMALL
    if request.param == "kernel":
        if not kernel_ok:
            pytest.skip("kernel layers need root and namespaces")
        return replace(SMALL, audit_hooks=False)
    return replace(SMALL, isolate=False, drop_privileges=False)


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


def test_normal_code_works_and_sees_its_files(tmp_path, kernel_ok):
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
    if kernel_ok:
        assert KERNEL_LAYERS | {"rlimits", "audit hook"} <= set(r.layers)
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
        assert r.killed == "time limit of 1 s"  # processes were made, up to RLIMIT_NPROC
    deadline = time.monotonic() + 2
    while nobody_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert nobody_alive() == []  # the pid namespace took every process with it


def test_subprocess_and_hook_bypasses_are_refused(kernel_ok):
    hook_only = replace(SMALL, isolate=False, drop_privileges=False)
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
        for config in (SMALL, hook_only):
            r = run_python(code, config=config)
            assert r.ok, r.stderr
            assert "ALLOWED" not in r.stdout and r.stdout.count("refused") == 10, r.stdout
            assert not os.path.exists(f"/tmp/sbx-{tag}")
    finally:
        if os.path.exists(f"/tmp/sbx-{tag}"):
            os.remove(f"/tmp/sbx-{tag}")


def test_resource_limits(kernel_ok):
    kernel = replace(SMALL, audit_hooks=False) if kernel_ok else SMALL
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


def test_chart_returns_a_png(tmp_path):
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
