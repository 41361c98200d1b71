"""Reference images and Pillow's results for Ladder's decoder and resize tests.

usage: pil_reference.py DIR
  Writes DIR/NAME.{jpg,png} in every format the decoder must handle, Pillow's RGB decode of
  each as DIR/NAME.rgb (raw bytes) and DIR/cases.json (name, format, width, height), and
  Pillow's bilinear resizes of photo.jpg for the boxes in DIR/resize.json as DIR/resize-N.rgb.
"""
import io
import json
import sys

import numpy as np
from PIL import Image


def photo(width, height, seed=0):
    # Smooth gradients, shapes and noise: enough structure for DCT and resampling to matter.
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 128 + 100 * np.sin(x / 37.0) * np.cos(y / 23.0)
    g = 128 + 90 * np.cos((x + y) / 51.0)
    b = 255 * (x / width) * (1 - y / height)
    img = np.stack([r, g, b], axis=-1)
    for _ in range(12):
        cx, cy, rad = rng.integers(0, width), rng.integers(0, height), rng.integers(10, 80)
        mask = (x - cx) ** 2 + (y - cy) ** 2 < rad**2
        img[mask] = rng.integers(0, 256, size=3)
    img += rng.normal(0, 6, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def main(out):
    base = photo(500, 375)
    cases = []

    def save(name, image, fmt, expected=None, **kwargs):
        ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt]
        path = f"{out}/{name}.{ext}"
        image.save(path, fmt, **kwargs)
        decoded = expected or Image.open(path).convert("RGB")
        with open(f"{out}/{name}.rgb", "wb") as f:
            f.write(decoded.tobytes())
        cases.append({"name": name, "format": fmt.lower(),
                      "width": decoded.width, "height": decoded.height})

    save("photo", base, "JPEG", quality=90)
    save("portrait", photo(375, 500, 1), "JPEG", quality=90)
    save("progressive", base, "JPEG", quality=90, progressive=True)
    save("subsampling444", base, "JPEG", quality=95, subsampling=0)
    save("gray", base.convert("L"), "JPEG", quality=90)
    save("cmyk", base.convert("CMYK"), "JPEG", quality=90)
    save("odd_size", photo(333, 211, 2), "JPEG", quality=85)
    save("rgb", base, "PNG")
    save("gray_png", base.convert("L"), "PNG")
    save("rgba", base.convert("RGBA"), "PNG")
    save("palette", base.convert("P"), "PNG")
    # Pillow clips 16-bit samples to 255 when converting to RGB; Ladder scales them to 8 bits,
    # so the expected pixels are the 8-bit image the 16-bit one was made from.
    gray = base.convert("L")
    save("sixteen_bit", Image.fromarray(np.asarray(gray).astype(np.uint16) * 257, "I;16"), "PNG",
         expected=gray.convert("RGB"))
    # WebP, as the hub's imagenet-w21-webp-wds shards hold it: lossy (Pillow's default
    # quality), lossless, with an alpha channel (dropped), at an odd size.
    save("webp", base, "WEBP", quality=80)
    save("webp_lossless", base, "WEBP", lossless=True)
    save("webp_alpha", base.convert("RGBA"), "WEBP", quality=90)
    save("webp_odd", photo(333, 211, 2), "WEBP", quality=85)
    with open(f"{out}/cases.json", "w") as f:
        json.dump(cases, f)

    with open(f"{out}/resize.json") as f:
        resizes = json.load(f)
    source = Image.open(f"{out}/photo.jpg").convert("RGB")
    for i, (box, size) in enumerate(resizes):
        resized = source.resize((size, size), Image.BILINEAR, box=tuple(box))
        with open(f"{out}/resize-{i}.rgb", "wb") as f:
            f.write(resized.tobytes())


if __name__ == "__main__":
    main(sys.argv[1])
