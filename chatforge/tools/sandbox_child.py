"""The program the python tool runs in its child process: never imported by the host.

Two stages, one process image each (see sandbox.py for what each layer guards):

    sandbox_child.py setup SETUP_JSON    as the caller (root or not): rlimits, namespaces, mounts,
                                         a fork into the new pid namespace, the uid drop, Landlock
                                         and seccomp (or a refusal naming the missing one), then
                                         exec of stage 2, so nothing of stage 1 (ctypes!) survives
    sandbox_child.py run RUN_JSON        as `nobody`: reads {code, prelude, epilogue, echo} from
                                         stdin, installs the audit hook, runs the code
"""

from __future__ import annotations

import _thread
import json
import os
import resource
import signal
import stat
import sys

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 24, 38
SETUP_FAILED = 125  # exit status when the sandbox itself could not be set up
REFUSED = 126  # exit status when a required layer is missing (the report says which)


# ==================================================================== stage 1: setup
def setup(cfg: dict) -> None:
    layers: list[str] = []
    os.umask(0o022)  # mount points made below must be enterable by the sandbox user
    lim = cfg["limits"]
    for which, value in [
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_CPU, lim["cpu_s"]),  # soft = hard: SIGKILL at the limit, nothing to catch
        (resource.RLIMIT_AS, lim["memory_bytes"]),
        (resource.RLIMIT_FSIZE, lim["file_bytes"]),
        (resource.RLIMIT_NOFILE, lim["open_files"]),
        (resource.RLIMIT_NPROC, lim["max_procs"]),  # binds once we are not root (see below)
    ]:
        hard = resource.getrlimit(which)[1]
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)  # without root, a limit can only go down
        resource.setrlimit(which, (value, value))
    layers.append("rlimits")

    import ctypes  # only in stage 1: stage 2 is a fresh exec that never imports it

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    root = os.geteuid() == 0
    flags = 0
    if cfg["isolate"]:
        want = (CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWPID) if root else (CLONE_NEWUSER | CLONE_NEWNET)
        if libc.unshare(want) == 0:
            flags = want
        else:
            layers.append(f"no namespaces ({os.strerror(ctypes.get_errno())})")
    if flags & CLONE_NEWNET:
        layers.append("network namespace")
    readable = False
    if flags & CLONE_NEWNS:
        try:
            readable = _mounts(libc, cfg)
            layers.append("private /tmp")
        except OSError as e:
            layers.append(f"mounts failed ({e})")
    if flags & CLONE_NEWPID:
        pid = os.fork()
        if pid:
            _relay(pid)  # the parent only waits; it never returns
        # pid 1 of the new namespace: when it exits, the kernel kills every process left in it
        layers.append("pid namespace")
        try:  # a /proc of this namespace: the host's processes are not listed there
            _mount(libc, b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        except OSError as e:
            layers.append(f"host /proc ({e})")

    dropped = False
    if cfg["drop_privileges"] and root:
        if readable or _readable_by_others(cfg["needed"]):
            os.setgroups([])
            os.setresgid(cfg["gid"], cfg["gid"], cfg["gid"])
            os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])  # clears every capability too
            layers.append(f"uid {cfg['uid']}")
            dropped = True
        else:
            layers.append("no uid drop (the Python install is not readable by other users)")
            for d, _, names in os.walk(cfg["workdir"]):  # the host gave the folder to the sandbox user: take it back
                for p in [d, *(os.path.join(d, n) for n in names)]:
                    os.chown(p, 0, 0, follow_symlinks=False)
    if root and not dropped and _drop_capabilities(libc):
        layers.append("no capabilities")  # still uid 0, but the exec below keeps no capability
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  # no setuid binary can give privileges back
    if flags & CLONE_NEWPID:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # after setuid, which clears it

    # the required kernel layers: Landlock (file system) and seccomp (system calls)
    missing = []
    abi = 0
    libseccomp = _load_libseccomp(cfg)  # before Landlock: finding the library runs ldconfig
    if "landlock" in cfg["without"]:
        missing.append(("Landlock", "switched off for this run"))
    else:
        abi, why = _landlock(libc, cfg)
        if why:
            missing.append(("Landlock", why))
        else:
            layers.append(f"landlock (ABI {abi})")
    if "seccomp" in cfg["without"]:
        missing.append(("seccomp", "switched off for this run"))
    else:
        why = libseccomp if isinstance(libseccomp, str) else _seccomp(libseccomp, abi)
        if why:
            missing.append(("seccomp", why))
        else:
            layers.append("seccomp")
    run = dict(cfg["run"], kernel_layers=not missing)
    if missing:
        what = "; ".join(f"{name} is missing ({why})" for name, why in missing)
        if not cfg["unsafe"]:
            _report(cfg, {"layers": layers, "refused": what})
            os._exit(REFUSED)
        layers.append(f"UNSAFE: {what}")
    _report(cfg, {"layers": layers})
    try:
        os.execv(
            sys.executable,
            [sys.executable, "-I", "-S", "-B", os.path.abspath(__file__), "run", json.dumps(run)],
        )
    except OSError as e:
        sys.stderr.write(f"sandbox setup failed: cannot start Python as the sandbox user ({e})\n")
        os._exit(SETUP_FAILED)


def _report(cfg: dict, message: dict) -> None:
    os.write(cfg["report_fd"], (json.dumps(message) + "\n").encode())


def _drop_capabilities(libc) -> bool:
    """Empty the bounding set, so the exec of stage 2 (still uid 0) starts with no capability:
    no CAP_DAC_OVERRIDE (root's files stay root's), no CAP_SYS_RESOURCE (rlimits hold)."""
    try:
        last = int(open("/proc/sys/kernel/cap_last_cap").read())
    except (OSError, ValueError):
        last = 40
    ok = True
    for cap in range(last + 1):
        ok &= libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) == 0
    return ok


# ---- Landlock: the file system the code may touch ---------------------------------------------------
LANDLOCK_CREATE_RULESET, LANDLOCK_ADD_RULE, LANDLOCK_RESTRICT_SELF = 444, 445, 446  # x86_64 and aarch64
LANDLOCK_CREATE_RULESET_VERSION, LANDLOCK_RULE_PATH_BENEATH = 1, 1
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1, 2, 4, 8
FS_ABI1 = (1 << 13) - 1  # execute .. make_sym: the 13 rights of the first version
FS_REFER, FS_TRUNCATE, FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15  # versions 2, 3 and 5
FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV
NET_BIND_TCP, NET_CONNECT_TCP = 1, 2  # version 4
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1, 2  # version 6
READ = FS_READ_FILE | FS_READ_DIR
READ_EXEC = READ | FS_EXECUTE
# what the interpreter reads besides its own install: the loader's cache, the time zone, user names
SYSTEM_READ = ["/usr", "/lib", "/lib64", "/lib32", "/bin", "/etc/ld.so.cache", "/etc/localtime",
               "/etc/passwd", "/etc/group", "/etc/nsswitch.conf", "/dev/urandom", "/dev/random",
               "/dev/zero", "/proc/self", "/sys/devices/system/cpu"]  # fmt: skip


def _landlock(libc, cfg: dict) -> tuple[int, str | None]:
    """Allow everything in the work folder, reading (and running) the interpreter and system
    libraries, /dev/null; nothing else: no write, no read of /etc/shadow or the user's files.
    Returns (ABI version, None) or (0, why it is missing)."""
    import ctypes

    if os.uname().machine not in ("x86_64", "aarch64"):
        return 0, f"not wired for {os.uname().machine} (x86_64 and aarch64 only)"
    abi = libc.syscall(LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), LANDLOCK_CREATE_RULESET_VERSION)
    if abi < 1:
        err = ctypes.get_errno()
        return 0, (
            f"{os.strerror(err)}: needs Linux >= 5.13 built with CONFIG_SECURITY_LANDLOCK and landlock "
            "in the lsm= boot list; a container's seccomp profile may also hide it"
        )
    fs = FS_ABI1 | (FS_REFER if abi >= 2 else 0) | (FS_TRUNCATE if abi >= 3 else 0)
    fs |= FS_IOCTL_DEV if abi >= 5 else 0
    net = (NET_BIND_TCP | NET_CONNECT_TCP) if abi >= 4 else 0
    scoped = (SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL) if abi >= 6 else 0
    attr = (ctypes.c_uint64 * 3)(fs, net, scoped)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    ruleset = libc.syscall(LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), 0)
    if ruleset < 0:
        return 0, f"creating the ruleset failed ({os.strerror(ctypes.get_errno())})"

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    # run nothing but this interpreter (and its loader): an exec of /bin/sh is refused too
    rules = [(p, READ) for p in [*cfg["needed"], *SYSTEM_READ]]
    rules += [(p, READ_EXEC) for p in [os.path.realpath(sys.executable), *_elf_interpreter(sys.executable)]]
    rules += [(cfg["child"], READ), ("/dev/null", FS_READ_FILE | FS_WRITE_FILE), (cfg["workdir"], fs)]
    try:
        for path, access in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue  # not on this machine (e.g. /lib32)
            try:
                if not stat.S_ISDIR(os.fstat(fd).st_mode):
                    access &= FILE_RIGHTS
                rule = PathBeneath(access & fs, fd)
                if libc.syscall(LANDLOCK_ADD_RULE, ruleset, LANDLOCK_RULE_PATH_BENEATH, ctypes.byref(rule), 0):
                    return 0, f"adding the rule for {path} failed ({os.strerror(ctypes.get_errno())})"
            finally:
                os.close(fd)
        if libc.syscall(LANDLOCK_RESTRICT_SELF, ruleset, 0):
            return 0, f"restricting failed ({os.strerror(ctypes.get_errno())})"
    finally:
        os.close(ruleset)
    try:  # check that it holds: the root folder is in no rule, so it cannot be listed
        os.listdir("/")
    except PermissionError:
        return abi, None
    return 0, "the ruleset was accepted but does not hold"


def _elf_interpreter(exe: str) -> list[str]:
    """The dynamic loader an ELF executable names (PT_INTERP), which the kernel runs with it."""
    import struct

    try:
        with open(os.path.realpath(exe), "rb") as f:
            head = f.read(64)
            if head[:4] != b"\x7fELF" or head[4] != 2:  # 64-bit ELF only
                return []
            phoff, = struct.unpack_from("<Q", head, 32)
            phentsize, phnum = struct.unpack_from("<HH", head, 54)
            for i in range(phnum):
                f.seek(phoff + i * phentsize)
                p_type, _, p_offset, _, _, p_filesz = struct.unpack("<IIQQQQ", f.read(40))
                if p_type == 3:  # PT_INTERP
                    f.seek(p_offset)
                    return [os.path.realpath(f.read(p_filesz).rstrip(b"\0").decode())]
    except (OSError, struct.error, UnicodeDecodeError):
        pass
    return []


# ---- seccomp: the system calls the code may make ----------------------------------------------------
# Refused with EPERM: the network, other processes (debugging, signals, their memory), new processes
# (only threads), namespaces and mounts, device nodes and fifos, kernel interfaces with a history
# of exploits, identity changes and raising limits.
DENIED_SYSCALLS = """
socket ptrace process_vm_readv process_vm_writev pidfd_open pidfd_send_signal pidfd_getfd kcmp
process_madvise tkill mknod mknodat unshare setns mount umount2 pivot_root chroot move_mount open_tree
fsopen fsconfig fsmount fspick mount_setattr bpf keyctl add_key request_key io_uring_setup
io_uring_enter io_uring_register userfaultfd perf_event_open fanotify_init name_to_handle_at
open_by_handle_at init_module finit_module delete_module kexec_load kexec_file_load reboot swapon
swapoff syslog acct settimeofday clock_settime clock_adjtime adjtimex sethostname setdomainname iopl
ioperm quotactl lookup_dcookie vhangup uselib fork vfork setuid setgid setreuid setregid setresuid
setresgid setgroups setfsuid setfsgid capset setrlimit memfd_create memfd_secret
""".split()
CLONE_NAMESPACES = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000
CLONE_THREAD, TIOCSTI = 0x00010000, 0x5412


def _load_libseccomp(cfg: dict):
    """The pyseccomp module (libseccomp loaded), or why it cannot be had."""
    sys.path.extend(cfg["run"]["sys_path"])  # pyseccomp is in site-packages; -I left it out
    try:
        import pyseccomp

        return pyseccomp
    except (ImportError, RuntimeError, OSError) as e:
        return (
            f"libseccomp could not be loaded ({e}): install the libseccomp2 system package "
            "and the pyseccomp Python package"
        )
    finally:
        del sys.path[-len(cfg["run"]["sys_path"]) :]


def _seccomp(sc, landlock_abi: int) -> str | None:
    """Install the filter (libseccomp through pyseccomp); None, or why it is missing."""
    import errno

    if sc.system_arch() not in (sc.Arch.X86_64, sc.Arch.AARCH64):
        return "the filter is written for x86_64 and aarch64 only"
    me = os.getpid()  # stays this process's pid across the exec of stage 2
    deny = sc.ERRNO(errno.EPERM)
    try:
        f = sc.SyscallFilter(sc.ALLOW)
        names = DENIED_SYSCALLS + (["truncate"] if landlock_abi < 3 else [])  # Landlock covers it from v3
        for name in names:
            if sc.resolve_syscall(sc.Arch.NATIVE, name) >= 0:  # not every call exists on every arch
                f.add_rule(deny, name)
        f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")  # flags hidden in a struct: glibc falls back to clone
        f.add_rule(deny, "clone", sc.Arg(0, sc.MASKED_EQ, CLONE_THREAD, 0))  # a process, not a thread
        for bit in range(32):  # or one that makes namespaces
            if CLONE_NAMESPACES & (1 << bit):
                f.add_rule(deny, "clone", sc.Arg(0, sc.MASKED_EQ, 1 << bit, 1 << bit))
        for name in ("kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo"):
            f.add_rule(deny, name, sc.Arg(0, sc.NE, me))  # signals only to itself
        f.add_rule(deny, "prlimit64", sc.Arg(2, sc.NE, 0))  # reading a limit is fine, setting one is not
        f.add_rule(deny, "ioctl", sc.Arg(1, sc.MASKED_EQ, 0xFFFFFFFF, TIOCSTI))  # typing into a terminal
        f.load()
    except OSError as e:
        return f"the kernel refused the filter ({e}): needs Linux built with CONFIG_SECCOMP_FILTER"
    try:  # check that it holds
        import socket

        socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()
    except PermissionError:
        return None
    return "the filter was loaded but does not hold"


def _relay(pid: int) -> None:
    """Wait for the namespace's pid 1 and end the same way it did (exit status or signal).

    The host stops a run with SIGTERM to this process: it kills pid 1 (the kernel then kills the
    rest of the namespace) and reaps it, so no zombie is left behind for the host's init."""
    signal.signal(signal.SIGTERM, lambda *_: os.kill(pid, signal.SIGKILL))
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        sig = -code
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        code = 128 + sig
    os._exit(code)


def _mount(libc, source, target, fstype, flags: int, data: bytes | None = None) -> None:
    import ctypes

    if libc.mount(source, target, fstype, flags, data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {target!r}: {os.strerror(err)}")


def _mounts(libc, cfg: dict) -> bool:
    """In the new mount namespace: cover the world-writable folders with empty read-only tmpfs, and
    make the Python install reachable by `nobody` by covering any directory above it that others may
    not enter (e.g. /root) with a tmpfs into which only the needed folders are bind-mounted back.
    Returns True when every needed path ends up readable by others."""
    _mount(libc, None, b"/", None, MS_REC | MS_PRIVATE)  # first: nothing below may propagate to the host
    work = os.path.realpath(cfg["workdir"])
    needed = _outermost([os.path.realpath(p) for p in cfg["needed"] if os.path.exists(p)])
    keep_all = _outermost(needed + [work])
    for top in cfg["hide"]:
        if os.path.isdir(top) and not os.path.islink(top):
            _overlay(libc, top, [p for p in keep_all if _under(p, top)])
    for _ in range(16):  # each pass fixes the highest closed directory of each path
        closed: dict[str, list[str]] = {}
        for p in keep_all:
            a = _closed_ancestor(p)
            if a is not None:
                closed.setdefault(a, []).append(p)
        if not closed:
            break
        for a, paths in closed.items():
            _overlay(libc, a, paths)
    return _readable_by_others(needed)


def _overlay(libc, top: str, keep: list[str]) -> None:
    fds = [(p, os.open(p, os.O_PATH)) for p in keep]  # opened before the tmpfs hides them
    _mount(libc, b"tmpfs", top.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=755,size=1m")
    for p, fd in fds:
        os.makedirs(p, mode=0o755, exist_ok=True)
        _mount(libc, f"/proc/self/fd/{fd}".encode(), p.encode(), None, MS_BIND | MS_REC)
        os.close(fd)
    # read-only once the mount points exist: even a run that kept root (no uid drop) cannot write here
    _mount(libc, None, top.encode(), None, MS_BIND | MS_REMOUNT | MS_RDONLY)


def _under(p: str, top: str) -> bool:
    return p == top or p.startswith(top.rstrip("/") + "/")


def _outermost(paths: list[str]) -> list[str]:
    """Drop paths that lie inside another path of the list."""
    out: list[str] = []
    for p in sorted(set(paths), key=len):
        if not any(_under(p, q) for q in out):
            out.append(p)
    return out


def _closed_ancestor(p: str) -> str | None:
    """The highest directory above p (not "/") that other users may not enter, or None."""
    parts = p.strip("/").split("/")
    for i in range(1, len(parts)):
        a = "/" + "/".join(parts[:i])
        if not os.stat(a).st_mode & 0o001:
            return a
    return None


def _readable_by_others(paths: list[str]) -> bool:
    for p in paths:
        if not os.path.exists(p):
            continue
        p = os.path.realpath(p)
        if _closed_ancestor(p) is not None or (os.stat(p).st_mode & 0o005) != 0o005:
            return False
    return True


# ==================================================================== stage 2: run the code
class SandboxDenied(PermissionError):
    """Raised by the audit hook; the traceback shown to the model stops at the denied call."""


class SandboxImportDenied(ImportError):
    """A refused import is an ImportError, so libraries that treat a module as optional (numpy and
    matplotlib with ctypes) still import."""


def run(cfg: dict) -> None:
    payload = json.loads(sys.stdin.buffer.read() or b"{}")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    work = cfg["workdir"]
    os.chdir(work)
    sys.path[:] = [work, *sys.path, *cfg["sys_path"]]
    layers = []
    if cfg["audit_hooks"]:
        _defuse_subprocess()
        # without the kernel layers the hook is all there is: nothing that hands out raw memory
        blocked = _BLOCKED_MODULES | (set() if cfg["kernel_layers"] else _RAW_MEMORY_MODULES)
        sys.addaudithook(_frozen_hook(os.path.realpath(work), blocked))
        layers.append("audit hook" if cfg["kernel_layers"] else "audit hook (no numpy, matplotlib, mmap)")
    _report(cfg, {"layers": layers})
    os.close(cfg["report_fd"])
    sys.exit(_execute(payload))


def _execute(payload: dict) -> int:
    import ast
    import linecache
    import types

    main = types.ModuleType("__main__")
    main.__builtins__ = __builtins__
    sys.modules["__main__"] = main  # the code's globals, like a script's
    source = payload.get("code", "")
    linecache.cache["<code>"] = (len(source), None, source.splitlines(True), "<code>")
    try:
        for name, src in (("<prelude>", payload.get("prelude", "")), ("<code>", source)):
            tree = ast.parse(src, name)
            last = None
            if name == "<code>" and payload.get("echo") and tree.body and isinstance(tree.body[-1], ast.Expr):
                last = ast.Expression(tree.body.pop().value)  # shown like in a REPL
            exec(compile(tree, name, "exec"), main.__dict__)
            if last is not None:
                value = eval(compile(last, name, "eval"), main.__dict__)
                if value is not None:
                    print(repr(value))
        exec(compile(payload.get("epilogue", ""), "<epilogue>", "exec"), main.__dict__)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except BaseException as e:
        _print_exception(e)
        return 1
    return 0


def _print_exception(e: BaseException) -> None:
    tb = e.__traceback__.tb_next if e.__traceback__ else None  # skip this file's exec() frame
    if (
        isinstance(e, SandboxDenied | SandboxImportDenied) and tb is not None
    ):  # the hook's own frame is the last one: cut it
        last = tb
        while last.tb_next is not None and last.tb_next.tb_next is not None:
            last = last.tb_next
        if last.tb_next is not None:
            last.tb_next = None
        else:
            tb = None
    try:
        import traceback

        traceback.print_exception(type(e), e, tb)
    except Exception:  # e.g. a chained exception that still points into the hook
        sys.excepthook(type(e), e, tb)


def _defuse_subprocess() -> None:
    """Import subprocess now (matplotlib imports it), then replace the one function that starts
    processes without an audit event; `import _posixsubprocess` anew is refused by the hook."""
    import _posixsubprocess
    import subprocess

    def fork_exec(*args, **kwargs):
        raise SandboxDenied("sandbox: starting processes is not allowed")

    _posixsubprocess.fork_exec = fork_exec
    subprocess._fork_exec = fork_exec


# ---- the audit hook ------------------------------------------------------------------------------
# Written as plain functions, then rebuilt with private globals (_frozen_hook): code that later
# patches builtins, os or this module cannot change what the hook calls. Its helpers are all C
# functions captured now; it never calls an object that came from the sandboxed code.
_DENY = {
    "os.fork",
    "os.forkpty",
    "os.posix_spawn",
    "os.spawn",
    "os.system",
    "os.exec",
    "os.chroot",
    "subprocess.Popen",
    "sys.settrace",
    "sys.setprofile",
    "sys._current_frames",
    "gc.get_objects",
    "gc.get_referrers",
    "gc.get_referents",
    "resource.setrlimit",
    "resource.prlimit",
}
_BLOCKED_MODULES = {"ctypes", "_ctypes", "_posixsubprocess", "cffi", "_cffi_backend", "_xxsubinterpreters"}
# raw memory (numpy's __array_interface__, mmap) rewrites the hook itself: refused unless the kernel
# layers hold whatever the code does
_RAW_MEMORY_MODULES = {"numpy", "matplotlib", "pandas", "scipy", "PIL", "torch", "mmap", "_testcapi",
                       "_testinternalcapi", "_testbuffer"}  # fmt: skip
# event -> (argument positions of paths that must lie in the work folder, position of dir_fd or -1)
_PATH_EVENTS = {
    "os.remove": ((0,), 1),
    "os.rmdir": ((0,), 1),
    "os.mkdir": ((0,), 2),
    "os.rename": ((0, 1), 2),
    "os.symlink": ((1,), 2),
    "os.link": ((0, 1), 2),
    "os.chmod": ((0,), 2),
    "os.chown": ((0,), 3),
    "os.utime": ((0,), 3),
    "os.truncate": ((0,), -1),
    "os.setxattr": ((0,), -1),
    "os.removexattr": ((0,), -1),
    "os.chflags": ((0,), -1),
}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
# What the hook calls: C functions captured here; the frozen copy takes these very objects
_get_ident, _getpid, _getcwd, _lstat, _readlink = (
    _thread.get_ident,
    os.getpid,
    os.getcwd,
    os.lstat,
    os.readlink,
)
_S_ISLNK, _bdecode = stat.S_ISLNK, bytes.decode
_WORK = "/nonexistent"  # the work folder: set in the frozen copy
_BUSY: list = [None]  # the thread inside the hook's own tb_frame lookup
_HOOK_CODES: frozenset = frozenset()  # code objects of the hook's functions: set in the frozen copy
_HOOK_NAMES = (
    "_WRITE_FLAGS",
    "SandboxDenied",
    "SandboxImportDenied",
    "_get_ident",
    "_getpid",
    "_getcwd",
    "_lstat",
    "_readlink",
    "_S_ISLNK",
    "_bdecode",
)


def _hook(event, args):
    if event == "open":
        path, mode, flags = args
        writes = (type(flags) is int and flags & _WRITE_FLAGS) or (
            type(mode) is str and ("w" in mode or "a" in mode or "x" in mode or "+" in mode)
        )
        if writes and type(path) is not int:
            # os.open(path, flags, dir_fd=...) reports no dir_fd: a relative os.open write is refused
            if (mode is None and not _is_abs(path)) or not _inside(path, None):
                raise SandboxDenied(
                    f"sandbox: writing {_shown(path)} is not allowed; write inside the working folder"
                )
    elif event in _PATH_EVENTS:
        positions, fd_pos = _PATH_EVENTS[event]
        dir_fd = args[fd_pos] if fd_pos >= 0 and fd_pos < len(args) else None
        if type(dir_fd) is not int or dir_fd < 0:  # the events report "no dir_fd" as -1
            dir_fd = None
        for i in positions:
            p = args[i]
            if type(p) is int and event == "os.truncate":
                continue  # a descriptor already opened for writing: the open was checked
            if not _inside(p, dir_fd):
                raise SandboxDenied(
                    f"sandbox: {event} on {_shown(p)} is not allowed outside the working folder"
                )
    elif event == "sqlite3.connect":  # the sqlite library opens its files itself, without an "open" event
        db = args[0]
        if type(db) is bytes:
            db = _bdecode(db, "utf-8", "surrogateescape")
        if type(db) is not str or not (
            db == ":memory:" or db == "" or (db[:5] != "file:" and _inside(db, None))
        ):
            raise SandboxDenied(
                f"sandbox: a database at {_shown(db)} is not allowed; give a plain path (a str) in the working folder"
            )
    elif event == "import":
        name = args[0]
        if type(name) is str and name.partition(".")[0] in _BLOCKED_MODULES:
            raise SandboxImportDenied(f"sandbox: importing {name} is not allowed")
    elif event in _DENY or (event.startswith("socket.") and event != "socket.__new__"):
        raise SandboxDenied(f"sandbox: {event} is not allowed (no processes, no network)")
    elif event == "object.__getattr__" and type(args[1]) is str and args[1] == "tb_frame":
        # a traceback through the hook must not hand out the hook's frame (its globals)
        me = _get_ident()
        if _BUSY[0] == me:
            return
        _BUSY[0] = me
        try:
            code = args[0].tb_frame.f_code
        finally:
            _BUSY[0] = None
        if code in _HOOK_CODES:
            raise SandboxDenied("sandbox: the sandbox's own frames are not accessible")
    elif event == "os.kill" and args[0] not in (0, _getpid()):
        raise SandboxDenied("sandbox: signalling other processes is not allowed")
    elif event == "os.killpg":
        raise SandboxDenied("sandbox: signalling process groups is not allowed")


def _shown(p):
    """repr of a str or bytes path; never of another object (its __repr__ would be the code's)."""
    return repr(p) if type(p) is str or type(p) is bytes else "a path object"


def _is_abs(p):
    if type(p) is bytes:
        return p[:1] == b"/"
    return type(p) is str and p[:1] == "/"


def _inside(path, dir_fd):
    """Whether path (str/bytes, relative to dir_fd or the cwd) resolves inside the work folder."""
    p = _resolve(path, dir_fd)
    return p is not None and (p == _WORK or p[: len(_WORK) + 1] == _WORK + "/" or p == "/dev/null")


def _resolve(path, dir_fd):
    """realpath from C primitives only (os.path.realpath could be monkeypatched by the code)."""
    if type(path) is bytes:
        path = _bdecode(path, "utf-8", "surrogateescape")
    if type(path) is not str:
        return None  # a path-like object: its __fspath__ is the code's; refuse rather than call it
    if path[:1] != "/":
        try:
            base = _getcwd() if dir_fd is None else _readlink(f"/proc/self/fd/{dir_fd}")
        except OSError:
            return None
        path = base + "/" + path
    out = []
    todo = path.split("/")
    todo.reverse()
    hops = 0
    while todo:
        c = todo.pop()
        if c == "" or c == ".":
            continue
        if c == "..":
            if out:
                out.pop()
            continue
        candidate = "/" + "/".join(out) + ("/" if out else "") + c
        try:
            st = _lstat(candidate)
        except OSError:
            out.append(c)  # does not exist (yet): taken as written
            continue
        if _S_ISLNK(st.st_mode):
            hops += 1
            if hops > 40:
                return None
            try:
                target = _readlink(candidate)
            except OSError:
                return None
            if target[:1] == "/":
                out = []
            more = target.split("/")
            more.reverse()
            todo.extend(more)
            continue
        out.append(c)
    return "/" + "/".join(out)


def _frozen_hook(work: str, blocked_modules: set[str]):
    """The hook, rebuilt so that its functions look names up in a private dict (see above)."""
    import builtins
    import types

    hook_functions = (_hook, _shown, _is_abs, _inside, _resolve)
    g = {name: globals()[name] for name in _HOOK_NAMES}
    g |= {
        "__builtins__": dict(builtins.__dict__),  # a private copy: patching builtins later does nothing
        "_WORK": work,
        "_DENY": frozenset(_DENY),
        "_BLOCKED_MODULES": frozenset(blocked_modules),
        "_PATH_EVENTS": dict(_PATH_EVENTS),
        "_HOOK_CODES": frozenset(f.__code__ for f in hook_functions),
        "_BUSY": [None],
    }
    for f in hook_functions:
        g[f.__name__] = types.FunctionType(f.__code__, g, f.__name__, f.__defaults__)
    return g["_hook"]


if __name__ == "__main__":
    stage, config = sys.argv[1], json.loads(sys.argv[2])
    try:
        if stage == "setup":
            setup(config)
        else:
            run(config)
    except OSError as e:  # anything the sandbox itself could not do: one line, its own exit status
        sys.stderr.write(f"sandbox setup failed: {e}\n")
        os._exit(SETUP_FAILED)
