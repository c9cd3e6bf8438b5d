"""CPU per write of each node of a sync pair under fio 4 KiB random writes QD16, hot.

Benchmark-only (the cfast prototype, bench/cfast/syncprimary.c).  For each system, started
fresh per repetition by bench/run.py's own start functions, alternated:
warm both images into the page cache, sync, the system's before-job checkpoint, then one fio
job; the CPU of each node (utime+stime of /proc/PID/stat, which counts the process's exited
threads too: nbdkit's worker threads exit with their connection) from just before fio starts
to just after it ends, divided by the writes fio completed.  Context switches are summed over
/proc/PID/task/*/status in a window inside the job (1 s after its start to 1 s before its end:
threads that exit take theirs with them) and divided by the writes in that window, estimated
at the job's mean rate.

    .venv/bin/python -m bench.cfast.cpu [--systems repdisk-sync,cfast-sync] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

from bench import run as br

TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float:
    """Seconds of CPU of the whole process (live and exited threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def task_switches(pid: int) -> int:
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/status") as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt", "nonvoluntary_ctxt")):
                        total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total


def machine_busy() -> tuple[float, float]:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v) / TICK, (v[3] + v[4]) / TICK  # total, idle+iowait


def nodes(cleanup: br.Cleanup) -> dict[str, int]:
    """name -> pid of the processes the system started (its Procs)."""
    procs = cleanup.__self__  # type: ignore[attr-defined]
    return {name: proc.pid for name, proc, _ in procs._procs}  # noqa: SLF001


def one(system: br.System, workdir: Path, runtime: int, out: Path) -> dict:
    uri, cleanup = system.start(workdir)
    try:
        pids = nodes(cleanup)
        br.warm_page_cache(workdir)
        os.sync()
        if system.before_job is not None:
            system.before_job(workdir)
        load = os.getloadavg()[0]
        cpu0 = {n: proc_cpu(p) for n, p in pids.items()}
        m0 = machine_busy()
        sw: dict[str, list[int]] = {}

        def window() -> None:
            time.sleep(1.0)
            sw["a"] = [task_switches(p) for p in pids.values()]
            sw["t0"] = [time.monotonic()]
            time.sleep(runtime - 2.0)
            sw["b"] = [task_switches(p) for p in pids.values()]
            sw["t1"] = [time.monotonic()]

        th = threading.Thread(target=window)
        th.start()
        sample = br.run_fio("cpu", uri, [*br.WORKLOADS["randwrite4k"].fio_options(),
                                         f"--runtime={runtime}", "--time_based"], out)
        th.join()
        cpu1 = {n: proc_cpu(p) for n, p in pids.items()}
        m1 = machine_busy()
        job = json.loads(out.read_text())["jobs"][0]
        writes = job["mixed"]["total_ios"]
        in_window = sample.iops * (sw["t1"][0] - sw["t0"][0])
        res = {"iops": sample.iops, "writes": writes, "load1": load,
               "machine_busy_cores": ((m1[0] - m1[1]) - (m0[0] - m0[1])) / (m1[0] - m0[0])
               * os.cpu_count(),
               "fio_cpu_us_per_write": (job["usr_cpu"] + job["sys_cpu"]) / 100
               * job["job_runtime"] / 1000 / writes * 1e6}
        for i, n in enumerate(pids):
            res[f"{n}_us_per_write"] = (cpu1[n] - cpu0[n]) / writes * 1e6
            res[f"{n}_cores"] = (cpu1[n] - cpu0[n]) / (job["job_runtime"] / 1000)
            res[f"{n}_switches_per_write"] = (sw["b"][i] - sw["a"][i]) / in_window
        return res
    finally:
        cleanup()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--systems", default="repdisk-sync,cfast-sync")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=5)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=Path("results/cfast-cpu.json"))
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="cfcpu-", dir="/var/tmp"))
    results: dict[str, list[dict]] = {}
    try:
        br.prepare_images(workdir, args.size_mib * br.MiB)
        for rep in range(args.reps):
            for name in args.systems.split(","):
                os.sync()
                r = one(br.SYSTEMS[name], workdir, args.runtime, workdir / f"{name}-{rep}.json")
                results.setdefault(name, []).append(r)
                print(name, rep, json.dumps({k: round(v, 2) for k, v in r.items()}),
                      flush=True)
    finally:
        br._stop_all_live()  # noqa: SLF001
        shutil.rmtree(workdir, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
