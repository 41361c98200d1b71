"""The peer side of `scripts/bench step`: torchvision's EfficientNetV2 with torch.optim.RMSprop
at Ladder's settings, timing forward, loss (label smoothing), backward and the optimizer step.

usage: step_peer.py VARIANT IMAGE_SIZE BATCH THREADS STEPS   (prints one JSON line)
"""
import json
import sys
import time
from functools import partial

import torch
import torch.nn.functional as F
import torchvision
from torchvision.models.efficientnet import EfficientNet, FusedMBConvConfig, MBConvConfig


def tiny(num_classes):
    # Ladder's `tiny` block table, built from torchvision's own block classes.
    setting = [
        FusedMBConvConfig(1, 3, 1, 16, 16, 1),
        FusedMBConvConfig(4, 3, 2, 16, 24, 2),
        MBConvConfig(4, 3, 2, 24, 48, 2),
        MBConvConfig(4, 3, 2, 48, 64, 1),
    ]
    return EfficientNet(setting, 0.0, last_channel=256, num_classes=num_classes,
                        norm_layer=partial(torch.nn.BatchNorm2d, eps=1e-3))


def main():
    variant, size, batch, threads, steps = sys.argv[1:6]
    size, batch, threads, steps = int(size), int(batch), int(threads), int(steps)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    classes = 1000
    if variant == "tiny":
        model = tiny(classes)
    else:
        model = getattr(torchvision.models, f"efficientnet_v2_{variant}")(num_classes=classes, dropout=0.0,
                                                                         stochastic_depth_prob=0.0)
    model.train()
    optimizer = torch.optim.RMSprop(model.parameters(), lr=0.01, alpha=0.9, eps=1e-3, momentum=0.9,
                                    weight_decay=1e-5)
    images = torch.randn(batch, 3, size, size)
    labels = torch.randint(classes, (batch,))

    def step():
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels, label_smoothing=0.1).backward()
        optimizer.step()

    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - start
    print(json.dumps({"images_per_second": batch * steps / seconds}))


if __name__ == "__main__":
    main()
