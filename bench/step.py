"""`scripts/bench step`: Ladder's CPU training step against torchvision + torch.optim.RMSprop,
same model, batch, image size and thread count, run alternately (A B A B ...) in fresh
processes; prints the median images/s of each and their ratio.
"""
import json
import os
import statistics
import subprocess
import sys

ROUNDS = int(os.environ.get("LADDER_BENCH_ROUNDS", "3"))
CASES = [("tiny", 128, 8, 2, 20), ("s", 128, 8, 2, 5)]


def run(command):
    env = dict(os.environ, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2")
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["images_per_second"]


def main():
    ladder_binary, python = sys.argv[1], sys.executable
    peer = os.path.join(os.path.dirname(__file__), "step_peer.py")
    print("CPU training step (forward, loss, backward, RMSProp), images/s, median of "
          f"{ROUNDS} alternating runs")
    print(f"{'model':<6} {'px':>4} {'batch':>5} {'threads':>7} {'ladder':>9} {'torchvision':>12} {'ratio':>6}")
    for variant, size, batch, threads, steps in CASES:
        args = [variant, str(size), str(batch), str(threads), str(steps)]
        ours, theirs = [], []
        for _ in range(ROUNDS):
            ours.append(run([ladder_binary, *args]))
            theirs.append(run([python, peer, *args]))
        a, b = statistics.median(ours), statistics.median(theirs)
        print(f"{variant:<6} {size:>4} {batch:>5} {threads:>7} {a:>9.2f} {b:>12.2f} {a / b:>6.2f}")


if __name__ == "__main__":
    main()
