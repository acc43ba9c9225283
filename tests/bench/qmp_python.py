"""Python `qemu.qmp` (PyPI) peer for tests/bench/qmp_roundtrip.rs.

Run by the Rust bench with a venv's python that has `qemu.qmp` installed
(tests/bench/run.sh makes one). Connects to SOCK, prints "ready", then for
every line N read on stdin does N `query-status` calls and prints their
durations in nanoseconds on one line. The bench interleaves these batches
with its own clients, so all clients see the same QEMU and the same drift.
"""

import asyncio
import sys
import time

from qemu.qmp import QMPClient


async def main(sock: str) -> None:
    qmp = QMPClient("bench")
    await qmp.connect(sock)
    loop = asyncio.get_running_loop()
    print("ready", flush=True)
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line.strip():
            break
        times = []
        for _ in range(int(line)):
            t = time.perf_counter_ns()
            await qmp.execute("query-status")
            times.append(time.perf_counter_ns() - t)
        print(" ".join(map(str, times)), flush=True)
    await qmp.disconnect()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
