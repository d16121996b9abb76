"""4 KiB echo through aiflow's Python API: p50, CPU/rt, voluntary switches/rt per thread name."""

import collections
import os
import sys
import tempfile
import time

from aiflow_cli.transport import Client, Identity, Message, Server


def threads():
    out = collections.Counter()
    for tid in os.listdir("/proc/self/task"):
        try:
            name = open(f"/proc/self/task/{tid}/comm").read().strip()
            for line in open(f"/proc/self/task/{tid}/status"):
                if line.startswith("voluntary_ctxt_switches"):
                    out[name[:6] + tid[-3:]] += int(line.split()[1])
        except OSError:
            pass
    return out


d = tempfile.mkdtemp()
ids = {n: Identity.generate(os.path.join(d, n)) for n in ("server", "client")}
srv = Server(
    "127.0.0.1:0",
    identity=ids["server"],
    trust=[ids["client"]],
    handler=lambda m, p: Message("echo", {}, list(m.frames)),
)
cl = Client(srv.address, identity=ids["client"], trust=[ids["server"]], timeout_s=120)
cl.connect()
payload = os.urandom(4096)
n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
for _ in range(200):
    cl.request(Message("echo", {}, [payload]))
t = []
s0, c0 = threads(), time.process_time()
for _ in range(n):
    a = time.perf_counter_ns()
    r = cl.request(Message("echo", {}, [payload]))
    t.append((time.perf_counter_ns() - a) / 1e3)
c1, s1 = time.process_time(), threads()
t.sort()
sw = {k: round((s1[k] - s0.get(k, 0)) / n, 2) for k in s1}
print(
    f"p50 {t[n // 2]:.0f} us p99 {t[int(n * 0.99)]:.0f} cpu {(c1 - c0) / n * 1e6:.0f} us/rt sw {sum(sw.values()):.2f}/rt {sw} load {os.getloadavg()[0]:.2f}"
)
cl.close()
srv.close()
