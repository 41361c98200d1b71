"""An independent oracle of the official EfficientNetV2 RandAugment operations.

Written here in numpy from the definitions in google/automl's efficientnetv2/autoaugment.py
(each operation's formula and its level-to-argument mapping, _MAX_LEVEL = 10, with no
clipping of levels past 10) and from how TensorFlow evaluates them: float32 arithmetic cast
back to uint8 by truncation, Python ints converted to the image's uint8 type modulo 256, shift
amounts clamped to 0..7 by TensorFlow's kernels, and TensorFlow Addons' projective transforms
(nearest pixel at integer coordinates, rounded half away from zero; outside filled with gray
128 through the official code's wrap/unwrap).

Usage: official_randaugment.py DIR. Writes DIR/cases.json and, for each case, its input photo
and expected output as raw 8-bit RGB: real photographs (scikit-image's), resized with Pillow.
"""

import json
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as photos

MAX_LEVEL = 10.0
LEVELS = [0, 5, 10, 20, 25]
SIGNED = {"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"}
OPERATIONS = [
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "Color",
    "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY",
    "Cutout", "SolarizeAdd",
]
F32 = np.float32


def to_uint8(values):
    """TensorFlow's cast of float32 to uint8 after a clip: truncation toward zero."""
    return np.clip(values, 0, 255).astype(np.uint8)


def blend(image1, image2, factor):
    if factor == 0.0:
        return image1.copy()
    if factor == 1.0:
        return image2.copy()
    a, b = image1.astype(F32), image2.astype(F32)
    temp = a + F32(factor) * (b - a)
    if 0.0 < factor < 1.0:
        return temp.astype(np.uint8)
    return to_uint8(temp)


def grayscale(image):
    scaled = image.astype(F32) * F32(1.0 / 255.0)
    gray = scaled @ np.array([0.2989, 0.5870, 0.1140], dtype=F32)
    return to_uint8(gray * F32(255.5))


def enhance_factor(level):
    return level / MAX_LEVEL * 1.8 + 0.1


def color(image, level):
    gray = grayscale(image)
    return blend(np.repeat(gray[..., None], 3, axis=2), image, enhance_factor(level))


def contrast(image, level):
    # The official code's mean: the histogram's count over 256 bins, clipped.
    count = image.shape[0] * image.shape[1]
    mean = F32(count) / F32(256.0)
    degenerate = np.full(image.shape, to_uint8(np.array(mean)), dtype=np.uint8)
    return blend(degenerate, image, enhance_factor(level))


def brightness(image, level):
    return blend(np.zeros_like(image), image, enhance_factor(level))


def sharpness(image, level):
    kernel = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=F32) / F32(13.0)
    x = image.astype(F32)
    h, w, _ = image.shape
    out = np.zeros((h - 2, w - 2, 3), dtype=F32)
    for dy in range(3):
        for dx in range(3):
            out += kernel[dy, dx] * x[dy:dy + h - 2, dx:dx + w - 2]
    degenerate = image.copy()
    degenerate[1:-1, 1:-1] = to_uint8(out)
    return blend(degenerate, image, enhance_factor(level))


def posterize(image, level):
    bits = int(level / MAX_LEVEL * 4)
    shift = min((8 - bits) % 256, 7)
    return ((image >> shift) << shift).astype(np.uint8)


def solarize(image, level):
    threshold = int(level / MAX_LEVEL * 256) % 256
    return np.where(image < threshold, image, 255 - image).astype(np.uint8)


def solarize_add(image, level):
    addition = int(level / MAX_LEVEL * 110)
    added = np.clip(image.astype(np.int64) + addition, 0, 255).astype(np.uint8)
    return np.where(image < 128, added, image)


def autocontrast(image):
    out = image.copy()
    for c in range(3):
        channel = image[..., c]
        lo, hi = F32(channel.min()), F32(channel.max())
        if hi > lo:
            scale = F32(255.0) / (hi - lo)
            offset = -lo * scale
            out[..., c] = to_uint8(channel.astype(F32) * scale + offset)
    return out


def equalize(image):
    out = image.copy()
    for c in range(3):
        channel = image[..., c].astype(np.int64)
        histogram = np.bincount(channel.ravel(), minlength=256)
        nonzero = histogram[histogram != 0]
        step = (nonzero.sum() - nonzero[-1]) // 255
        if step == 0:
            continue
        lut = (np.cumsum(histogram) + step // 2) // step
        lut = np.clip(np.concatenate([[0], lut[:-1]]), 0, 255)
        out[..., c] = lut[channel].astype(np.uint8)
    return out


def transform(image, matrix):
    """tfa's projective transform [a0, a1, a2, b0, b1, b2]: output (x, y) reads input
    (a0 x + a1 y + a2, b0 x + b1 y + b2), the nearest pixel, gray outside."""
    h, w, _ = image.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(F32)
    a0, a1, a2, b0, b1, b2 = (F32(v) for v in matrix)
    in_x = a0 * xs + a1 * ys + a2
    in_y = b0 * xs + b1 * ys + b2
    # std::round: half away from zero.
    ix = (np.sign(in_x) * np.floor(np.abs(in_x) + F32(0.5))).astype(np.int64)
    iy = (np.sign(in_y) * np.floor(np.abs(in_y) + F32(0.5))).astype(np.int64)
    inside = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
    out = np.full_like(image, 128)
    out[inside] = image[iy[inside], ix[inside]]
    return out


def rotate(image, level, negative):
    degrees = level / MAX_LEVEL * 30.0 * (-1 if negative else 1)
    radians = degrees * math.pi / 180.0
    h, w, _ = image.shape
    c, s = math.cos(radians), math.sin(radians)
    x_offset = ((w - 1) - (c * (w - 1) - s * (h - 1))) / 2.0
    y_offset = ((h - 1) - (s * (w - 1) + c * (h - 1))) / 2.0
    return transform(image, [c, -s, x_offset, s, c, y_offset])


def shear(image, level, negative, axis):
    amount = level / MAX_LEVEL * 0.3 * (-1 if negative else 1)
    matrix = [1, amount, 0, 0, 1, 0] if axis == "x" else [1, 0, 0, amount, 1, 0]
    return transform(image, matrix)


def translate(image, level, negative, axis):
    pixels = level / MAX_LEVEL * 100.0 * (-1 if negative else 1)
    # tfa.translate(image, [dx, dy]) reads (x - dx, y - dy); the official code passes -pixels.
    matrix = [1, 0, pixels, 0, 1, 0] if axis == "x" else [1, 0, 0, 0, 1, pixels]
    return transform(image, matrix)


def cutout(image, level, center):
    pad = int(level / MAX_LEVEL * 40)
    h, w, _ = image.shape
    cy, cx = center
    lower, upper = max(0, cy - pad), max(0, h - cy - pad)
    left, right = max(0, cx - pad), max(0, w - cx - pad)
    out = image.copy()
    out[lower:h - upper, left:w - right] = 128
    return out


def apply(name, image, level, negative, center):
    return {
        "AutoContrast": lambda: autocontrast(image),
        "Equalize": lambda: equalize(image),
        "Invert": lambda: (255 - image).astype(np.uint8),
        "Rotate": lambda: rotate(image, level, negative),
        "Posterize": lambda: posterize(image, level),
        "Solarize": lambda: solarize(image, level),
        "Color": lambda: color(image, level),
        "Contrast": lambda: contrast(image, level),
        "Brightness": lambda: brightness(image, level),
        "Sharpness": lambda: sharpness(image, level),
        "ShearX": lambda: shear(image, level, negative, "x"),
        "ShearY": lambda: shear(image, level, negative, "y"),
        "TranslateX": lambda: translate(image, level, negative, "x"),
        "TranslateY": lambda: translate(image, level, negative, "y"),
        "Cutout": lambda: cutout(image, level, center),
        "SolarizeAdd": lambda: solarize_add(image, level),
    }[name]()


def main():
    out = Path(sys.argv[1])
    sources = {
        "astronaut": (photos.astronaut(), (160, 120)),
        "coffee": (photos.coffee(), (144, 112)),
        "chelsea": (photos.chelsea(), (112, 144)),
        "rocket": (photos.rocket(), (128, 128)),
    }
    cases = []
    rng = np.random.default_rng(7)
    for name, (pixels, (width, height)) in sources.items():
        photo = np.asarray(Image.fromarray(pixels).convert("RGB").resize((width, height), Image.BILINEAR))
        photo_file = f"{name}.rgb"
        (out / photo_file).write_bytes(photo.tobytes())
        for op in OPERATIONS:
            for level in LEVELS:
                for negative in ([False, True] if op in SIGNED else [False]):
                    # Cutout's center, as fractions of the height and width (Ladder's draw).
                    fy, fx = rng.random(), rng.random()
                    center = (min(int(fy * height), height - 1), min(int(fx * width), width - 1))
                    expected = apply(op, photo, float(level), negative, center)
                    file = f"{name}-{op}-{level}-{int(negative)}.rgb"
                    (out / file).write_bytes(np.ascontiguousarray(expected).tobytes())
                    cases.append({
                        "photo": photo_file, "width": width, "height": height, "op": op,
                        "level": level, "negative": negative, "center": [fy, fx],
                        "expected": file,
                    })
    (out / "cases.json").write_text(json.dumps(cases))


if __name__ == "__main__":
    main()
