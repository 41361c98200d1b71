"""The peer side of `scripts/bench data`: Pillow decoding and torchvision transforms on PIL
images, one thread: RandomResizedCrop, RandomHorizontalFlip, RandAugment(2, 9), ToTensor,
Normalize. Prints images/s as one JSON line.

usage: data_peer.py DIR SIZE PASSES   (DIR's .jpg and .webp files)
"""
import glob
import io
import json
import sys
import time

import torch
from PIL import Image
from torchvision import transforms


def main(directory, size, passes):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    paths = sorted(glob.glob(f"{directory}/*.jpg") + glob.glob(f"{directory}/*.webp"))
    files = [open(p, "rb").read() for p in paths]
    transform = transforms.Compose([
        transforms.RandomResizedCrop(size),
        transforms.RandomHorizontalFlip(),
        transforms.RandAugment(num_ops=2, magnitude=9),
        transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])
    start = time.perf_counter()
    for _ in range(passes):
        for data in files:
            transform(Image.open(io.BytesIO(data)).convert("RGB"))
    seconds = time.perf_counter() - start
    print(json.dumps({"images_per_second": len(files) * passes / seconds}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
