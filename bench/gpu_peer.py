"""The PyTorch eager peer of `scripts/gpu-check`: torchvision's EfficientNetV2-S training step
on one GPU with bfloat16 autocast and channels_last, at the sizes and micro-batches Ladder
trains, fed from tensors already on the GPU (so it measures the model step alone).
GPU_PEER_DEVICE=cpu runs it on the CPU, in float32, a few steps: the check's dry run.

usage: gpu_peer.py CLASSES SIZE:MICRO:GLOBAL [SIZE:MICRO:GLOBAL ...]   (prints JSON lines)
"""
import os
import json
import sys
import time

import torch
import torch.nn.functional as F
import torchvision


def main():
    classes = int(sys.argv[1])
    device = os.environ.get("GPU_PEER_DEVICE", "cuda")
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model = torchvision.models.efficientnet_v2_s(num_classes=classes).to(device)
    model = model.to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.RMSprop(model.parameters(), lr=0.01, alpha=0.9, eps=1e-3,
                                    momentum=0.9, weight_decay=1e-5)
    for shape in sys.argv[2:]:
        size, micro, global_batch = (int(v) for v in shape.split(":"))
        images = torch.randn(micro, 3, size, size, device=device).to(memory_format=torch.channels_last)
        labels = torch.randint(classes, (micro,), device=device)
        accumulate = global_batch // micro

        def step():
            optimizer.zero_grad(set_to_none=False)
            for _ in range(accumulate):
                with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
                    loss = F.cross_entropy(model(images), labels, label_smoothing=0.1)
                (loss / accumulate).backward()
            optimizer.step()

        for _ in range(5 if cuda else 1):
            step()
        sync()
        steps = 20 if cuda else 2
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        seconds = time.perf_counter() - start
        print(json.dumps({"size": size, "micro": micro,
                          "images_per_second": global_batch * steps / seconds}), flush=True)


if __name__ == "__main__":
    main()
