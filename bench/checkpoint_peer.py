"""The peer side of `scripts/bench checkpoint`: torchvision's EfficientNetV2-L with
torch.optim.RMSprop state (square average and momentum for every parameter) and an EMA copy of
the weights, saved with torch.save as one dict. Prints one JSON line: the median seconds of
torch.save alone (the training loop is blocked for all of it) and of torch.save plus fsync.

usage: checkpoint_peer.py DIR ROUNDS
"""
import json
import os
import statistics
import sys
import time

import torch
import torchvision


def main():
    directory, rounds = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(2)
    model = torchvision.models.efficientnet_v2_l()
    optimizer = torch.optim.RMSprop(model.parameters(), lr=0.01, alpha=0.9, eps=1e-3, momentum=0.9)
    for p in model.parameters():
        optimizer.state[p] = {"step": torch.tensor(1.0), "square_avg": torch.ones_like(p),
                              "momentum_buffer": torch.zeros_like(p)}
    ema = {k: v.clone() for k, v in model.state_dict().items()}
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "ema": ema}
    path = os.path.join(directory, "torch-save.pt")
    saves, synced = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        with open(path, "wb") as f:
            torch.save(state, f)
            saves.append(time.perf_counter() - start)
            f.flush()
            os.fsync(f.fileno())
        synced.append(time.perf_counter() - start)
        size = os.path.getsize(path)
        os.remove(path)
    print(json.dumps({"save_s": statistics.median(saves), "save_fsync_s": statistics.median(synced),
                      "bytes": size}))


if __name__ == "__main__":
    main()
