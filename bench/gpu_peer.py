"""The PyTorch eager peer of `scripts/gpu-check`: torchvision's EfficientNetV2-S training step
on one GPU with bfloat16 autocast and channels_last, at the sizes and micro-batches Ladder
trains, fed from tensors already on the GPU (so it measures the model step alone).

usage: gpu_peer.py CLASSES SIZE:MICRO:GLOBAL [SIZE:MICRO:GLOBAL ...]   (prints JSON lines)
"""
import json
import sys
import time

import torch
import torch.nn.functional as F
import torchvision


def main():
    classes = int(sys.argv[1])
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model = torchvision.models.efficientnet_v2_s(num_classes=classes).cuda()
    model = model.to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.RMSprop(model.parameters(), lr=0.01, alpha=0.9, eps=1e-3,
                                    momentum=0.9, weight_decay=1e-5)
    for shape in sys.argv[2:]:
        size, micro, global_batch = (int(v) for v in shape.split(":"))
        images = torch.randn(micro, 3, size, size, device="cuda").to(memory_format=torch.channels_last)
        labels = torch.randint(classes, (micro,), device="cuda")
        accumulate = global_batch // micro

        def step():
            optimizer.zero_grad(set_to_none=False)
            for _ in range(accumulate):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = F.cross_entropy(model(images), labels, label_smoothing=0.1)
                (loss / accumulate).backward()
            optimizer.step()

        for _ in range(5):
            step()
        torch.cuda.synchronize()
        steps = 20
        start = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        print(json.dumps({"size": size, "micro": micro,
                          "images_per_second": global_batch * steps / seconds}), flush=True)


if __name__ == "__main__":
    main()
