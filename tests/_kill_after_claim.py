"""Worker 1 of 3 (a child process) is killed once the chief has claimed its section; another save in
the folder cleans debris; then worker 2 publishes and the chief commits. Exits 0 when both the chief
and worker 2 succeeded. Used by tests/test_multi_worker.py."""

import glob
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np

import asyncckpt as ac


def build():
    model = ac.Module()
    model.a = ac.Variable(np.arange(4000, dtype=np.float64))
    model.b = ac.Variable(np.arange(3000, dtype=np.float64))
    model.c = ac.Variable(np.arange(2000, dtype=np.float64))
    return ac.Checkpoint(model=model)


def options(index):
    # (no lock probe: worker 2 starts only once the chief has claimed worker 1's section)
    return ac.CheckpointOptions(multi_worker=ac.MultiWorker(index, 3, timeout_seconds=60, check_locks=False))


def main(folder):
    path = os.path.join(folder, "p")
    go = threading.Event()
    results = {}

    def play(index):
        if index == 2:
            go.wait()
        try:
            build().write(path, options=options(index))
            results[index] = "ok"
        except BaseException as exc:  # noqa: BLE001 - reported below
            results[index] = repr(exc)

    threads = [threading.Thread(target=play, args=(index,)) for index in (0, 2)]
    for thread in threads:
        thread.start()
    child = subprocess.Popen([sys.executable, __file__, "--worker", path])
    deadline = time.monotonic() + 60
    while not glob.glob(path + ".index.claim-*") and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    other = ac.Module()
    other.x = ac.Variable(np.zeros(3))
    ac.Checkpoint(m=other).write(os.path.join(folder, "other"))  # cleans debris in the folder
    go.set()
    for thread in threads:
        thread.join()
    print(results)
    return 0 if results == {0: "ok", 2: "ok"} else 1


if __name__ == "__main__":
    if sys.argv[1] == "--worker":
        build().write(sys.argv[2], options=options(1))
    else:
        sys.exit(main(sys.argv[1]))
