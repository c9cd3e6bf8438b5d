"""The walk of one guest write through repdisk: which functions and modules it crosses.

    .venv/bin/python -m bench.write_walk            # sync and async, a summary each
    .venv/bin/python -m bench.write_walk --calls    # also every call, in order

It starts a real pair (two nbdkit processes with the repdisk plugin, on Unix sockets in a
temporary folder), writes one aligned 4 KiB block into the primary's export with libnbd,
and records, with a profile hook, every call of a repdisk function the write causes: on
the primary, from the plugin's ``pwrite`` until it returns (the guest's thread) and on the
forwarder's thread meanwhile and shortly after (an async write is sent after its
acknowledgement); on the secondary, in the plugin's ``pwrite`` that applies it, down to the
disk file's write.  A burst of concurrent writes (so that every nbdkit thread has served
one) and a few single writes go first, so that nothing is done for the first time.

Reported per write mode:

* ``functions``: distinct repdisk functions called (both nodes, every thread);
* ``modules``: distinct modules they belong to (the plugin counts as ``nbdplugin``);
* ``hops``: the modules in call order, a run of calls inside one module counted once;
* ``back``: calls into a module that the walk entered earlier than the caller's module
  (a callback, or a module calling its own code again after handing work to another):
  the back-and-forth a layered walk does not have.

This file is also the nbdkit plugin of both nodes: loaded by nbdkit it runs the real
plugin (nbdplugin/repdisk.py) in its own namespace and wraps its ``pwrite`` with the hook;
its one key of its own, ``walk-out=FILE``, says where the records go (one JSON line per
guest write).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
PLUGIN = os.path.join(ROOT, "nbdplugin", "repdisk.py")
#: The builtin: the real plugin, run in this module's namespace, defines its own open().
_open = open
#: How long after a write's arrival the forwarder's thread is still followed.
FOLLOW = 0.3
#: Writes before the measured one, and the pause between writes (longer than FOLLOW).
WARMUPS, PAUSE = 3, 0.5
#: Concurrent writes before those: more than the nodes' nbdkit threads (16).
BURST = 64


# -- inside nbdkit: the recording plugin ------------------------------------------------------

class _Recorder:
    """Calls of repdisk functions during a window after each guest write (one at a time)."""

    def __init__(self) -> None:
        self.out: str | None = None
        self.until = 0.0                 # record other threads' calls until then
        self.events: list[tuple[str, str, str, str]] = []  # (thread, caller, module, func)
        self.lock = threading.Lock()
        self.guest = 0                   # the ident of the thread in pwrite

    @staticmethod
    def module(frame) -> str | None:
        if frame.f_code.co_filename == PLUGIN:
            return "nbdplugin"
        name = frame.f_globals.get("__name__", "")
        return name if name.startswith("repdisk") else None

    def caller(self, frame) -> str:
        frame = frame.f_back
        while frame is not None:
            mod = self.module(frame)
            if mod is not None:
                return mod
            frame = frame.f_back
        return ""

    def hook(self, frame, event: str, arg) -> None:
        if event != "call":
            return
        ident = threading.get_ident()
        if ident != self.guest and time.monotonic() > self.until:
            return
        thread = threading.current_thread().name
        if ident != self.guest and not thread.startswith("repdisk-forwarder"):
            return  # the control socket's, the isolation monitor's, the recorder's timer
        mod = self.module(frame)
        if mod is None:
            return
        with self.lock:
            self.events.append(("guest" if ident == self.guest else thread,
                                self.caller(frame), mod, frame.f_code.co_qualname))

    def traced(self, fn):
        def pwrite(h, buf, offset, flags):
            with self.lock:
                self.events = []
                self.guest = threading.get_ident()
                self.until = time.monotonic() + FOLLOW
            began = time.time()
            sys.setprofile(self.hook)
            try:
                return fn(h, buf, offset, flags)
            finally:
                sys.setprofile(None)
                timer = threading.Timer(FOLLOW, self.dump, (began, offset))
                timer.daemon = True
                timer.start()
        return pwrite

    def dump(self, began: float, offset: int) -> None:
        with self.lock:
            events, self.events, self.guest = self.events, [], 0
        if self.out is not None:
            with _open(self.out, "a") as f:
                f.write(json.dumps({"time": began, "offset": offset, "events": events}) + "\n")


def _as_plugin() -> None:
    """Run nbdplugin/repdisk.py here, with its pwrite recorded and walk-out= taken."""
    recorder = _Recorder()
    namespace = globals()
    with _open(PLUGIN) as f:
        code = compile(f.read(), PLUGIN, "exec")
    exec(code, namespace)  # noqa: S102 - the real plugin, in this script's namespace
    plugin_config = namespace["config"]

    def config(key: str, value: str) -> None:
        if key == "walk-out":
            recorder.out = value
        else:
            plugin_config(key, value)

    namespace["config"] = config
    namespace["pwrite"] = recorder.traced(namespace["pwrite"])
    threading.setprofile(recorder.hook)  # the forwarder's thread starts later


# -- the driver ---------------------------------------------------------------------------

def _qmp(path: str, command: str, **args) -> dict:
    """One control command over the node's QMP socket; its return value."""
    import socket
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        f = s.makefile("rwb")
        f.readline()  # the greeting
        for cmd, cargs in (("qmp_capabilities", {}), (command, args)):
            f.write(json.dumps({"execute": cmd, "arguments": cargs}).encode() + b"\n")
            f.flush()
            while True:
                reply = json.loads(f.readline())
                if "return" in reply:
                    break
                if "error" in reply:
                    raise RuntimeError(f"{command}: {reply['error']}")
        return reply["return"]


def _start_node(folder: str, name: str, keys: list[str]) -> tuple[subprocess.Popen, str]:
    sock = os.path.join(folder, f"{name}.sock")
    control = os.path.join(folder, f"{name}.qmp")
    log = os.path.join(folder, f"{name}.log")
    with _open(log, "w") as out:
        proc = subprocess.Popen(
            ["nbdkit", "-f", "-t", "16", "-U", sock, "python", os.path.realpath(__file__),
             f"control={control}", f"walk-out={os.path.join(folder, name + '.walk')}", *keys],
            stdout=out, stderr=out)
    deadline = time.monotonic() + 20
    while not (os.path.exists(control) and os.path.exists(sock)):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not start; see {log}")
        time.sleep(0.05)
    time.sleep(0.2)
    return proc, sock


def _last_record(path: str) -> list[tuple[str, str, str, str]]:
    with _open(path) as f:
        return json.loads(f.read().splitlines()[-1])["events"]


def walk(mode: str, folder: str) -> dict:
    """Start a pair in ``mode``, write WARMUPS + 1 blocks; the measured write's calls."""
    import nbd
    size = 64 << 20
    for name in ("pri", "sec"):
        with _open(os.path.join(folder, f"{name}.img"), "wb") as f:
            f.truncate(size)
    procs = []
    try:
        sec, sec_sock = _start_node(folder, "sec", ["role=secondary",
                                                    f"disk={folder}/sec.img"])
        procs.append(sec)
        _qmp(os.path.join(folder, "sec.qmp"), "replication-start", mode="secondary")
        pri, pri_sock = _start_node(folder, "pri", [
            "role=primary", f"disk={folder}/pri.img", f"write-mode={mode}", "timeout=60s",
            f"secondary=nbd+unix:///replica?socket={sec_sock}"])
        procs.append(pri)
        _qmp(os.path.join(folder, "pri.qmp"), "replication-start", mode="primary")
        h = nbd.NBD()
        h.connect_unix(pri_sock)
        # A burst first, so that every nbdkit thread of the primary and the secondary has
        # served a request: a thread's first request pins its Python state (threadstate.py),
        # once in the thread's life.
        buf = nbd.Buffer.from_bytearray(bytearray(4096))
        for i in range(BURST):
            h.aio_pwrite(buf, (16 << 20) + i * 4096)
        while h.aio_in_flight():
            h.poll(-1)
        time.sleep(PAUSE + FOLLOW)
        for i in range(WARMUPS + 1):
            offset = (1 << 20) if i == WARMUPS else (8 << 20) + i * (64 << 10)
            h.pwrite(bytes([i + 1]) * 4096, offset)
            time.sleep(PAUSE + FOLLOW)
        h.shutdown()
        with _open(os.path.join(folder, "sec.img"), "rb") as f:
            f.seek(1 << 20)
            assert f.read(4096) == bytes([WARMUPS + 1]) * 4096, "the write did not arrive"
        primary = _last_record(os.path.join(folder, "pri.walk"))
        secondary = _last_record(os.path.join(folder, "sec.walk"))
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    return summarize(primary + [("secondary", c, m, f) for _, c, m, f in secondary])


def imports() -> dict[str, set[str]]:
    """Every repdisk module's repdisk imports, direct and indirect (from the source)."""
    import ast
    src = os.path.join(ROOT, "src")
    direct: dict[str, set[str]] = {}
    for folder, _, files in os.walk(os.path.join(src, "repdisk")):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            mod = os.path.relpath(path, src)[:-3].replace(os.sep, ".").removesuffix(".__init__")
            found = direct.setdefault(mod, set())
            with _open(path) as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    found.update(a.name for a in node.names if a.name.startswith("repdisk"))
                elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("repdisk"):
                    found.add(node.module)
                    found.update(f"{node.module}.{a.name}" for a in node.names)
    closure: dict[str, set[str]] = {}

    def reach(mod: str) -> set[str]:
        if mod not in closure:
            closure[mod] = set()
            for dep in direct.get(mod, ()):
                if dep in direct:
                    closure[mod] |= {dep} | reach(dep)
        return closure[mod]

    for mod in direct:
        reach(mod)
    closure["nbdplugin"] = set(direct)
    return closure


def summarize(events: list) -> dict:
    """Counts of one walk: ``events`` are (thread, caller module, module, function)."""
    deps = imports()
    hops: list[tuple[str, str]] = []
    for thread, _caller, mod, _func in events:
        if not hops or hops[-1] != (thread, mod):
            hops.append((thread, mod))
    seen: set[tuple[str, str]] = set()
    again = []
    for thread, mod in hops:
        if (thread, mod) in seen:
            again.append(f"{thread}: {mod}")
        seen.add((thread, mod))
    up = sorted({f"{c} -> {m}.{f}" for _, c, m, f in events
                 if c and c != m and c in deps.get(m, ())})
    primary = [e for e in events if e[0] != "secondary"]
    return {
        "functions": len({(m, f) for _, _, m, f in events}),
        "modules": len({m for _, _, m, _ in events}),
        "primary_functions": len({(m, f) for _, _, m, f in primary}),
        "primary_modules": len({m for _, _, m, _ in primary}),
        "calls": len(events),
        "hops": len(hops),
        "reentries": len(again),
        "upcalls": len(up),
        "module_list": list(dict.fromkeys(m for _, _, m, _ in events)),
        "hop_list": [f"{t}: {m}" for t, m in hops],
        "reentry_list": again,
        "upcall_list": up,
        "events": events,
    }


def main() -> None:
    import argparse
    import tempfile
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", action="store_true", help="print every call, in order")
    parser.add_argument("--json", help="also write the results to this file")
    opts = parser.parse_args()
    results = {}
    for mode in ("sync", "async"):
        with tempfile.TemporaryDirectory(prefix="write-walk-") as folder:
            r = results[mode] = walk(mode, folder)
        print(f"{mode}: {r['functions']} functions in {r['modules']} modules "
              f"(primary: {r['primary_functions']} in {r['primary_modules']}), "
              f"{r['hops']} module hops, {r['reentries']} re-entries, "
              f"{r['upcalls']} calls against the imports")
        print("  modules:    " + ", ".join(r["module_list"]))
        print("  hops:       " + " > ".join(r["hop_list"]))
        print("  re-entered: " + ", ".join(r["reentry_list"]))
        for b in r["upcall_list"]:
            print(f"  upcall:     {b}")
        if opts.calls:
            for thread, caller, mod, func in r["events"]:
                print(f"    [{thread}] {mod}.{func}  (from {caller or '-'})")
    if opts.json:
        with _open(opts.json, "w") as f:
            json.dump({m: {k: v for k, v in r.items() if k != "events"}
                       for m, r in results.items()}, f, indent=1)


try:
    import nbdkit  # noqa: F401 - present only inside nbdkit's Python plugin
except ImportError:
    if __name__ == "__main__":
        main()
else:
    _as_plugin()
