"""An ImageNet-like JPEG corpus from the real photographs bundled with scikit-image: random crops
of each photo, resized to 500x375 or 375x500, mild noise, quality 90 (about ImageNet's typical
file). Deterministic for a seed.

usage: data_corpus.py DIR COUNT
"""
import sys

import numpy as np
import skimage.data
from PIL import Image

PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "motorcycle_right",
          "immunohistochemistry", "hubble_deep_field", "retina", "colorwheel"]


def photos():
    for name in PHOTOS:
        try:
            image = getattr(skimage.data, name)()
        except Exception:  # a photo missing from this scikit-image build
            continue
        if image.ndim == 3 and image.shape[2] >= 3:
            yield Image.fromarray(np.ascontiguousarray(image[..., :3]).astype(np.uint8))


def main(out, count):
    rng = np.random.default_rng(0)
    sources = list(photos())
    for i in range(count):
        src = sources[i % len(sources)]
        w, h = src.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
        size = (500, 375) if rng.random() < 0.75 else (375, 500)
        img = np.asarray(src.crop((x, y, x + cw, y + ch)).resize(size, Image.BICUBIC)).astype(np.float32)
        img += rng.normal(0, 3, img.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(f"{out}/{i:04d}.jpg", quality=90)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
