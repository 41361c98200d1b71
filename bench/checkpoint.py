"""`scripts/bench checkpoint`: EfficientNetV2-L's training state (model + RMSProp + EMA, 1.9 GB)
checkpointed by Ladder and by torch.save in one run, with the disk's sequential write speed
measured between Ladder's rounds. Ladder's training loop waits only for what the next step's
forward and backward passes did not hide of the host snapshot's copy; the write (safetensors,
SHA-256, fsync, rename) runs in the background. Goals: blocked time <= 10% of
torch.save's; write throughput >= 80% of the disk's.

usage: checkpoint.py BENCH_CHECKPOINT_BINARY DIR
"""
import json
import os
import subprocess
import sys

ROUNDS = int(os.environ.get("LADDER_BENCH_ROUNDS", "5"))


def run(command):
    out = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    binary, directory = sys.argv[1], sys.argv[2]
    os.makedirs(directory, exist_ok=True)
    peer = os.path.join(os.path.dirname(__file__), "checkpoint_peer.py")
    # The disk's speed is measured by the Ladder process between its rounds (a plain 8 MiB
    # write loop of the same size, then fsync), so both see the same moment of this machine.
    ladder = run([binary, directory, str(ROUNDS)])
    torch = run([sys.executable, peer, directory, str(ROUNDS)])
    disk_bps = ladder["bytes"] / ladder["disk_s"]
    ladder_bps = ladder["bytes"] / ladder["write_s"]
    # What a checkpoint costs the training loop: the time it waits, plus how much the step the
    # copy runs beside slows down (both share this machine's cores).
    slowdown = max(0.0, ladder["step_beside_s"] - ladder["step_alone_s"])
    cost = ladder["blocked_s"] + slowdown
    blocked_ratio = cost / torch["save_s"]
    # Each round's write against the disk test right after it (the disk's speed swings by 2x
    # on these machines within a minute), then the median of those ratios.
    throughput_ratio = ladder["paired_ratio"]
    mb = 1e6
    print(f"EfficientNetV2-L state: {ladder['bytes'] / mb:.0f} MB (Ladder), "
          f"{torch['bytes'] / mb:.0f} MB (torch.save); medians of {ROUNDS} rounds")
    print(f"{'':<42} {'ladder':>9} {'torch.save':>11} {'ratio':>7}")
    print(f"{'training loop waits per checkpoint, s':<42} {ladder['blocked_s']:>9.3f}")
    print(f"{'  + slowdown of the step beside the copy, s':<42} {slowdown:>9.3f} "
          f"({ladder['step_alone_s']:.3f} -> {ladder['step_beside_s']:.3f} s, L fwd+bwd 2x128px)")
    print(f"{'= cost to training per checkpoint, s':<42} {cost:>9.3f} {torch['save_s']:>11.3f} "
          f"{blocked_ratio:>7.3f}   (goal <= 0.10)")
    print(f"{'  (a snapshot taken at once would block, s)':<42} {ladder['synchronous_s']:>9.3f}"
          f"   first, allocating: {ladder['first_synchronous_s']:.3f}")
    print(f"{'write incl. fsync, s':<42} {ladder['write_s']:>9.3f} {torch['save_fsync_s']:>11.3f}")
    print(f"{'write throughput vs disk, MB/s':<42} {ladder_bps / mb:>9.0f} {disk_bps / mb:>11.0f} "
          f"{throughput_ratio:>7.2f}   (goal >= 0.80)")
    print("  (disk: 8 MiB writes + fsync after each round, through the page cache and with direct I/O,\n"
          "   the faster of the two; the ratio is the median of the rounds' ratios)")
    print("  per round, Ladder's write vs the disk's, s: " + ", ".join(
        f"{w:.3f}/{d:.3f}" for w, d in zip(ladder["write_rounds_s"], ladder["disk_rounds_s"])))
    ok = blocked_ratio <= 0.10 and throughput_ratio >= 0.80
    print("goals met" if ok else "goal missed")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
