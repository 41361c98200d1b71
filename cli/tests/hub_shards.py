"""Writes WebDataset shards as the hub's `imagenet-w21-webp-wds` holds them, with webdataset's
own TarWriter and Pillow: `KEY.webp` images (lossy, one lossless, one with alpha) with `KEY.cls`
integer labels and a `KEY.json` of metadata (one sample has only the .json's `label`), into OUT/shard-000000.tar and -000001.tar.
Prints the number of samples per class as JSON."""
import io
import json
import sys

import webdataset as wds
from PIL import Image

out, classes = sys.argv[1], 4
counts = [0] * classes
for shard in range(2):
    with wds.TarWriter(f"{out}/imagenet-w21-webp-wds-{shard:06d}.tar") as sink:
        for i in range(10):
            n = shard * 10 + i
            label = n % classes
            img = Image.new("RGB", (64 + n, 48), (n * 12 % 256, 80, 255 - n * 9 % 256))
            for x in range(0, img.width, 5):
                img.putpixel((x, x % img.height), (255, 255, 255))
            if n == 3:
                img = img.convert("RGBA")
            buf = io.BytesIO()
            img.save(buf, "WEBP", **({"lossless": True} if n == 7 else {"quality": 85}))
            sample = {"__key__": f"n{n:08d}", "webp": buf.getvalue(), "cls": label,
                      "json": {"filename": f"n{n:08d}.JPEG", "label": label}}
            if n == 5:
                del sample["cls"]  # labelled by its .json alone
            sink.write(sample)
            counts[label] += 1
print(json.dumps(counts))
