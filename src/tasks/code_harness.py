# The trusted test harness (code_rpc.py is prepended). It never imports or execs the solution:
# the solution runs in a separate worker process (code_worker.py), and the names the tests take
# from `solution` are proxies that call it over two pipes. The verdict goes to memgen on fd 3,
# which the worker never inherits; the harness is non-dumpable before the worker exists, so the
# worker (same uid) can neither ptrace it nor open /proc/<harness>/fd or /proc/<harness>/mem.
# Nothing the worker prints, no exit status and no patching inside the worker reaches the verdict.
#
# Files beside it, written by memgen: tests.py (trusted, from the dataset), names.json (the
# solution's top-level function names), imports.json (the solution's plain import statements),
# solution.py and worker.py (read by the worker only).

import ast
import ctypes
import sys

# The script's directory is the scratch dir, which the worker can write: drop it from the import
# path, or a planted `random.py` would be imported by the tests in this trusted process.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if p and os.path.abspath(p) != _HERE]

REPORT_FD = 3
PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3


def report(obj):
    data = json.dumps(obj, separators=(",", ":")).encode() + b"\n"
    while data:
        data = data[os.write(REPORT_FD, data):]


class WorkerPeer(Peer):
    pass


def solution_proxy(peer, name, load_error):
    def proxy(*args, **kwargs):
        if load_error is not None:
            raise load_error
        return peer.call(name, args, kwargs)

    proxy.__name__ = proxy.__qualname__ = name
    return proxy


def safe_imports(statements):
    """Run the solution's import lines in the tests' namespace (the original ran solution and
    tests in one module, so tests may use e.g. `math` imported only by the solution). Only
    unaliased `import m` / `from m import n` binding a name that is not a builtin: an alias or a
    shadowed builtin (`from operator import not_ as abs`) could change what a test computes."""
    bound = {}
    for text in statements:
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        for node in tree.body:
            if isinstance(node, ast.Import):
                for a in node.names:
                    top = a.name.split(".")[0]
                    if a.asname is None and top not in ("solution", "__main__") \
                            and not hasattr(builtins, top):
                        try:
                            bound[top] = __import__(a.name)
                        except Exception:
                            pass
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                    and node.module.split(".")[0] not in ("solution", "__main__", "builtins"):
                for a in node.names:
                    if a.asname is None and a.name != "*" and not hasattr(builtins, a.name):
                        try:
                            mod = __import__(node.module, fromlist=[a.name])
                            bound[a.name] = getattr(mod, a.name)
                        except Exception:
                            pass
    return bound


def main():
    # The report fd must exist and must not leak into the worker.
    os.set_inheritable(REPORT_FD, False)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0 or libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) != 0:
        report({"done": False, "error": "cannot make the harness non-dumpable"})
        return
    with open("tests.py", encoding="utf-8") as f:
        tests_src = f.read()
    with open("names.json", encoding="utf-8") as f:
        names = json.load(f)
    with open("imports.json", encoding="utf-8") as f:
        imports = json.load(f)
    # The worker need not see the tests (it could read expected outputs from them).
    os.unlink("tests.py")
    try:
        code = compile(tests_src, "tests.py", "exec")
    except SyntaxError as e:
        report({"done": True, "collected": 0, "results": [], "error": "tests: %s" % e})
        return
    bound = safe_imports(imports)

    # Two pipes for the RPC and nothing else: close_fds drops fd 3, stdio goes to /dev/null.
    to_worker_r, to_worker_w = os.pipe()
    from_worker_r, from_worker_w = os.pipe()
    # (os.posix_spawn rather than subprocess, whose imports double the harness's start-up.) Every
    # descriptor Python opens is close-on-exec, fd 3 was made so above, and only the worker's
    # two pipe ends are made inheritable.
    os.set_inheritable(to_worker_r, True)
    os.set_inheritable(from_worker_w, True)
    worker = os.posix_spawn(
        sys.executable,
        [sys.executable, "-I", "-B", "worker.py", str(to_worker_r), str(from_worker_w)],
        {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"},
        file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                      (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                      (os.POSIX_SPAWN_DUP2, 1, 2)])
    os.close(to_worker_r)
    os.close(from_worker_w)
    peer = WorkerPeer(from_worker_r, to_worker_w)
    load_error = None
    try:
        first = peer.recv()
        if first != ["ready"]:
            if first[0] == "exc" and len(first) == 3:
                load_error = remote_exception(first[1], first[2])
            else:
                load_error = ProtocolError("worker did not start")
    except Exception as e:
        load_error = e

    g = {"__name__": "tests", "__builtins__": builtins}
    g.update(bound)
    module = types.ModuleType("solution")
    for name in names:
        p = solution_proxy(peer, name, load_error)
        g[name] = p
        setattr(module, name, p)
    sys.modules["solution"] = module

    results = []
    error = None
    try:
        exec(code, g)
    except BaseException as e:  # noqa: B036 -- a test module raising SystemExit fails too
        error = "tests module: %s: %s" % (type(e).__name__, _text(e)[:300])
    if error is None:
        # Every test_* function the test code defined, in definition order (as the original
        # runner collected them from its globals).
        tests = [(n, f) for n, f in list(g.items())
                 if n.startswith("test_") and isinstance(f, types.FunctionType)
                 and f.__code__.co_filename == "tests.py"]
        for name, f in tests:
            try:
                f()
                results.append([name, True, ""])
            except BaseException as e:  # noqa: B036 -- sys.exit() in a test fails that test
                results.append([name, False, "%s: %s" % (type(e).__name__, _text(e)[:300])])
    try:
        os.kill(worker, 9)
    except OSError:
        pass
    out = {"done": True, "collected": len(results), "results": results}
    if error is not None:
        out["error"] = error
    report(out)


main()
