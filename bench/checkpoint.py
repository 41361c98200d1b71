"""`scripts/bench checkpoint`: EfficientNetV2-L's training state (model + RMSProp + EMA, 1.9 GB)
checkpointed by Ladder and by torch.save in one run, with the disk's sequential write speed
measured between Ladder's rounds. Ladder's training loop is blocked only for the host snapshot; the write
(safetensors, SHA-256, fsync, rename) runs in the background. Goals: blocked time <= 10% of
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
    blocked_ratio = ladder["blocked_s"] / torch["save_s"]
    throughput_ratio = ladder_bps / disk_bps
    mb = 1e6
    print(f"EfficientNetV2-L state: {ladder['bytes'] / mb:.0f} MB (Ladder), "
          f"{torch['bytes'] / mb:.0f} MB (torch.save); medians of {ROUNDS} rounds")
    print(f"{'':<34} {'ladder':>10} {'torch.save':>11} {'ratio':>7}")
    print(f"{'training blocked per checkpoint, s':<34} {ladder['blocked_s']:>10.3f} "
          f"{torch['save_s']:>11.3f} {blocked_ratio:>7.3f}   (goal <= 0.10)")
    print(f"{'  first checkpoint (allocates), s':<34} {ladder['first_blocked_s']:>10.3f}")
    print(f"{'write incl. fsync, s':<34} {ladder['write_s']:>10.3f} {torch['save_fsync_s']:>11.3f}")
    print(f"{'write throughput vs disk, MB/s':<34} {ladder_bps / mb:>10.0f} {disk_bps / mb:>11.0f} "
          f"{throughput_ratio:>7.2f}   (disk: sequential write + fsync; goal >= 0.80)")
    ok = blocked_ratio <= 0.10 and throughput_ratio >= 0.80
    print("goals met" if ok else "goal missed")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
