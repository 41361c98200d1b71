"""One rank of the gloo side of `scripts/bench allreduce`: torch.distributed's gloo backend,
allreduce (sum) of float32 tensors; rank 0 prints seconds per allreduce per size as JSON.

usage: allreduce_peer.py RANK WORLD PORT MEGABYTES...
"""
import json
import sys
import time

import torch
import torch.distributed as dist


def main():
    rank, world, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    sizes = [int(s) for s in sys.argv[4:]]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results = {}
    for mb in sizes:
        data = torch.ones(mb * 1024 * 1024 // 4, dtype=torch.float32)
        dist.all_reduce(data)
        reps = 3
        start = time.perf_counter()
        for _ in range(reps):
            dist.all_reduce(data)
        results[str(mb)] = (time.perf_counter() - start) / reps
    if rank == 0:
        print(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
