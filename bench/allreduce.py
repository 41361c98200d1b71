"""`scripts/bench allreduce`: Ladder's CPU TCP ring against torch.distributed's gloo backend,
2 ranks on loopback, float32 buffers of 16 to 480 MB (EfficientNetV2-L's gradients are
474 MB); bus bandwidth 2 (n - 1) / n * bytes / time, median of alternating runs, and the ratio.
"""
import json
import os
import socket
import statistics
import subprocess
import sys

ROUNDS = int(os.environ.get("LADDER_BENCH_ROUNDS", "3"))
SIZES = [16, 64, 256, 480]
WORLD = 2


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(commands):
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, text=True) for c in commands]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a rank failed: {[p.returncode for p in procs]}")
    return json.loads(outs[0].strip().splitlines()[-1])


def ours(binary):
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(WORLD)]
    sizes = [str(s) for s in SIZES]
    return run_ranks([[binary, str(r), *addresses, "--", *sizes] for r in range(WORLD)])


def gloo():
    port = free_port()
    here = os.path.dirname(os.path.abspath(__file__))
    sizes = [str(s) for s in SIZES]
    return run_ranks([[sys.executable, f"{here}/allreduce_peer.py", str(r), str(WORLD), str(port), *sizes]
                      for r in range(WORLD)])


def main():
    binary = sys.argv[1]
    ladder, peer = {s: [] for s in SIZES}, {s: [] for s in SIZES}
    for _ in range(ROUNDS):
        for s, t in ours(binary).items():
            ladder[int(s)].append(t)
        for s, t in gloo().items():
            peer[int(s)].append(t)
    factor = 2 * (WORLD - 1) / WORLD
    print(f"allreduce, {WORLD} ranks on loopback, float32; bus bandwidth GB/s, median of {ROUNDS} alternating runs")
    print(f"{'MB':>5} {'ladder ring':>12} {'gloo':>8} {'ratio':>6}")
    for s in SIZES:
        a = factor * s * 2**20 / statistics.median(ladder[s]) / 1e9
        b = factor * s * 2**20 / statistics.median(peer[s]) / 1e9
        print(f"{s:>5} {a:>12.2f} {b:>8.2f} {a / b:>6.2f}")


if __name__ == "__main__":
    main()
