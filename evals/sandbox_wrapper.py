"""The first Python code inside the sandbox (evals/sandbox.py starts it as
`python -I -B -c <this file> <json settings>`; standard library only, imports nothing of rdp).

1. Reads the program from stdin (stdin then becomes /dev/null), sets the kernel limits
   (CPU, address space, processes, file size, open files, no core dumps) and, when it starts
   as root inside the sandbox, becomes the run's own uid (no capabilities left).
2. Runs the program. Any exception, SystemExit, os._exit, signal or limit ends the process
   here, before step 3.
3. Only after the program's last statement (for HumanEval: `check(entry_point)`) returned:
   if no other thread or process of the program is left alive (one could race for the
   channel), it reads the run's token from the token pipe and copies it to the report pipe,
   then leaves with os._exit (atexit handlers and finalizers of the program never run).

The token enters this process only in step 3; the evaluator counts a pass when the report
pipe holds exactly its token. Exiting early, printing, exit codes, atexit / excepthook tricks
cannot produce it. (Code written against this wrapper can still read the pipe itself, just as
it can defeat `assert f(x) == y` with an always-equal object; that is outside what any
sandbox can decide.)

The audit hook below is an optional extra layer (PEP 578); the program can reach and disable
it (its state is this module's globals, `sys.modules['__main__']`). Isolation rests on the OS
sandbox around this process, never on it.
"""
import json
import os
import resource
import signal
import sys

GUARD_ACTIVE = False
WORKDIR = "/"
READABLE = ()
BLOCKED_PREFIXES = ("socket.", "os.kill", "os.killpg", "signal.pthread_kill", "os.fork", "os.forkpty",
                    "os.posix_spawn", "os.spawn", "os.exec", "os.system", "subprocess.", "ctypes.",
                    "os.putenv", "os.unsetenv", "os.setuid", "os.chroot", "pty.", "resource.setrlimit",
                    "sys.setprofile", "sys.settrace", "os.startfile", "webbrowser.")
PATH_EVENTS = {"os.remove", "os.rmdir", "os.rename", "os.link", "os.symlink", "os.truncate", "os.chmod",
               "os.chown", "os.utime", "os.mkdir", "shutil.rmtree", "shutil.move", "shutil.copyfile",
               "os.chflags", "os.lchown", "os.setxattr", "os.removexattr"}


def inside(path):
    try:
        path = os.path.realpath(os.fsdecode(path))
    except Exception:
        return False
    return (path + "/").startswith(WORKDIR + "/")


def readable(path):
    try:
        real = os.path.realpath(os.fsdecode(path))
    except Exception:
        return False
    return real in ("/dev/null", "/dev/urandom") or (real + "/").startswith(READABLE)


def guard(event, args):
    if not GUARD_ACTIVE:
        return
    if event.startswith(BLOCKED_PREFIXES):
        raise PermissionError(f"sandbox guard: {event} is not allowed")
    if event == "open":
        path, mode, flags = args
        if isinstance(path, int):
            return
        if isinstance(mode, str):
            writing = any(c in mode for c in "wax+")
        else:
            writing = bool((flags or 0) & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND))
        if not inside(path) and (writing or not readable(path)):
            raise PermissionError(f"sandbox guard: {'writing' if writing else 'reading'} {path!r} is not allowed")
    elif event in PATH_EVENTS:
        for path in args[:2]:
            if isinstance(path, (str, bytes, os.PathLike)) and not inside(path):
                raise PermissionError(f"sandbox guard: {event} on {path!r} outside the working directory")


def set_limits(cfg):
    limits = {resource.RLIMIT_CPU: (cfg["cpu_s"], cfg["cpu_s"] + 1), resource.RLIMIT_CORE: (0, 0),
              resource.RLIMIT_AS: (cfg["memory_bytes"],) * 2, resource.RLIMIT_FSIZE: (cfg["file_bytes"],) * 2,
              resource.RLIMIT_NOFILE: (cfg["open_files"],) * 2, resource.RLIMIT_NPROC: (cfg["max_processes"],) * 2}
    for kind, value in limits.items():
        resource.setrlimit(kind, value)


def others_alive(pid_namespace):
    """Threads of this process besides this one, and processes of the program besides this one
    (in its own PID namespace: anything but the namespace's init and this process)."""
    alive = [t for t in os.listdir("/proc/self/task") if t != str(os.getpid())]
    if pid_namespace:
        for entry in os.listdir("/proc"):
            if entry.isdigit() and entry not in ("1", str(os.getpid())):
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        state = f.read().rsplit(")", 1)[1].split()[0]
                except OSError:  # exited meanwhile
                    continue
                if state not in ("Z", "X"):  # zombies have exited; they wait only for a reaper
                    alive.append(entry)
    return alive


def main():
    global GUARD_ACTIVE, WORKDIR, READABLE
    cfg = json.loads(sys.argv[1])
    # the channel's ends: closed by any exec (a replacement process cannot report)
    token_fd, report_fd = os.dup(cfg["token_fd"]), os.dup(cfg["report_fd"])
    os.close(cfg["token_fd"])
    os.close(cfg["report_fd"])
    for fd in (token_fd, report_fd):
        os.set_inheritable(fd, False)
    source = sys.stdin.read()
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    set_limits(cfg)
    if cfg["run_as"] is not None:  # root inside the sandbox: become the run's own unprivileged uid
        os.setgroups([])
        os.setgid(cfg["run_as"])
        os.setuid(cfg["run_as"])
    # what the last step uses, bound now: the program may replace module attributes
    read, write, exit_now, block = os.read, os.write, os._exit, signal.pthread_sigmask
    stdout, stderr, settrace, setprofile = sys.stdout, sys.stderr, sys.settrace, sys.setprofile
    import gc
    gc_disable, gc_callbacks = gc.disable, gc.callbacks
    if cfg["python_guard"]:
        WORKDIR = os.path.realpath(os.getcwd())
        READABLE = tuple(os.path.realpath(p) + "/" for p in {sys.prefix, sys.base_prefix, sys.exec_prefix,
                         os.path.dirname(os.__file__), "/usr/lib", "/usr/local/lib", "/usr/share/zoneinfo"})
        GUARD_ACTIVE = True
        sys.addaudithook(guard)
    sys.argv = ["program.py"]
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    exec(compile(source, "program.py", "exec"), namespace)

    # the program's last statement returned
    GUARD_ACTIVE = False
    settrace(None)
    setprofile(None)
    gc_disable()
    gc_callbacks.clear()
    for stream in (stdout, stderr):
        try:
            stream.flush()
        except Exception:
            pass
    block(signal.SIG_BLOCK, signal.valid_signals())
    left = others_alive(cfg["pid_namespace"])
    if left:
        write(2, f"\nsandbox: the program left {len(left)} thread(s)/process(es) running; not counted as passed\n"
              .encode())
        exit_now(3)
    write(report_fd, read(token_fd, 64))
    exit_now(0)


if __name__ == "__main__":
    main()
