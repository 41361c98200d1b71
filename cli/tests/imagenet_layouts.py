"""Writes ImageNet's release layouts in small, with Python's own tarfile and Pillow (the tools
that made the real archives' kind), for `cli/tests/imagenet.rs`:

  OUT/synsets/<wnid>.tar      per-synset tars, with ImageNet's oddities in the first: a
                              grayscale and a CMYK JPEG, a PNG named .JPEG, a zero-byte
                              .JPEG, a text member, a second member of the same name; the third
                              tar is cut inside its third member's header
  OUT/train.tar               a tar of those tars under winter21_whole/ (the release's shape)
  OUT/train.tar.gz            the same, compressed as tarfile compresses it (the release's
                              winter21_whole.tar.gz), and a text member after the tars
  OUT/members.tar.gz          train.tar compressed in two gzip members, cut inside a synset
                              tar (as pigz and bgzip write them: one member per block)
  OUT/verify.tar.gz           one synset tar of two JPEGs and a third cut to a third of its
                              bytes (a truncated download that still starts like a JPEG)
  OUT/tar-cut.tar.gz          train.tar cut after its first synset tar, then compressed whole:
                              a gzip that ends well around a tar that does not
  OUT/val.tar                 flat ILSVRC2012_val_NNNNNNNN.JPEG images, one not labelled
  OUT/LOC_val_solution.csv    Kaggle's labels: ImageId,PredictionString (the wnid first)
  OUT/devkit/data/            the ILSVRC-2012 devkit's meta.mat (scipy.io.savemat, compressed
                              as MATLAB writes it; ids in another order than the wnids) and
                              ILSVRC2012_validation_ground_truth.txt, labelling all 7 images
"""
import gzip
import io
import os
import sys
import tarfile

import numpy as np
import scipy.io
from PIL import Image

WNIDS = ["n01440764", "n01443537", "n01484850"]


def image(seed, mode="RGB", fmt="JPEG"):
    colour = {"RGB": (seed * 40 % 256, 90, 200 - seed * 7 % 200), "L": seed * 30 % 256,
              "CMYK": (seed * 20 % 256, 40, 80, 10)}[mode]
    img = Image.new(mode, (48 + seed % 5, 40), colour)
    for x in range(0, img.width, 7):
        img.putpixel((x, x % img.height), colour if mode == "L" else tuple(255 - c for c in colour))
    out = io.BytesIO()
    img.save(out, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()


def add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def synset_tar(path, members):
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            add(tar, name, data)


def main():
    out = sys.argv[1]
    os.makedirs(f"{out}/synsets")
    first, second, third = WNIDS
    synset_tar(f"{out}/synsets/{first}.tar",
               [(f"{first}_{i}.JPEG", image(i)) for i in range(6)]
               + [(f"{first}_gray.JPEG", image(6, "L")),
                  (f"{first}_cmyk.JPEG", image(7, "CMYK")),
                  (f"{first}_png.JPEG", image(8, fmt="PNG")),
                  (f"{first}_empty.JPEG", b""),
                  ("readme.txt", b"not an image"),
                  (f"{first}_0.JPEG", image(9))])
    synset_tar(f"{out}/synsets/{second}.tar", [(f"{second}_{i}.JPEG", image(10 + i)) for i in range(5)])
    # Four members, then the file cut 100 bytes into the third member's header.
    path = f"{out}/synsets/{third}.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(4):
            if i == 2:
                cut = tar.offset + 100
            add(tar, f"{third}_{i}.JPEG", image(20 + i))
    with open(path, "r+b") as f:
        f.truncate(cut)
    with tarfile.open(f"{out}/train.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for wnid in WNIDS:
            tar.add(f"{out}/synsets/{wnid}.tar", arcname=f"winter21_whole/{wnid}.tar")
    with tarfile.open(f"{out}/train.tar.gz", "w:gz", format=tarfile.USTAR_FORMAT) as tar:
        for wnid in WNIDS:
            tar.add(f"{out}/synsets/{wnid}.tar", arcname=f"winter21_whole/{wnid}.tar")
        add(tar, "winter21_whole/README", b"one tar per synset")
    with tarfile.open(f"{out}/train.tar") as tar:
        member = tar.next()
        cut = member.offset_data + (member.size + 511) // 512 * 512
    with open(f"{out}/train.tar", "rb") as whole, gzip.open(f"{out}/tar-cut.tar.gz", "wb") as out_:
        out_.write(whole.read(cut))
    synset = io.BytesIO()
    with tarfile.open(fileobj=synset, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(3):
            data = image(40 + i)
            add(tar, f"{WNIDS[0]}_{i}.JPEG", data if i < 2 else data[:len(data) // 3])
    with tarfile.open(f"{out}/verify.tar.gz", "w:gz", format=tarfile.USTAR_FORMAT) as tar:
        add(tar, f"winter21_whole/{WNIDS[0]}.tar", synset.getvalue())
    with open(f"{out}/train.tar", "rb") as whole, open(f"{out}/members.tar.gz", "wb") as out_:
        plain = whole.read()
        out_.write(gzip.compress(plain[:cut + 1000]) + gzip.compress(plain[cut + 1000:]))
    labels = ["ImageId,PredictionString"]
    with tarfile.open(f"{out}/val.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(1, 8):
            image_id = f"ILSVRC2012_val_{i:08d}"
            add(tar, f"{image_id}.JPEG", image(30 + i))
            if i < 7:
                wnid = WNIDS[i % 3]
                labels.append(f"{image_id},{wnid} 10 12 40 38 {wnid} 1 2 30 30")
    with open(f"{out}/LOC_val_solution.csv", "w") as f:
        f.write("\n".join(labels) + "\n")
    # The devkit numbers classes its own way: ids 1, 2, 3 are the third, first, second wnid.
    ids = {WNIDS[2]: 1, WNIDS[0]: 2, WNIDS[1]: 3}
    synsets = np.zeros((3, 1), dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"),
                                      ("num_train_images", "O")])
    for row, (wnid, id_) in enumerate(sorted(ids.items(), key=lambda kv: kv[1])):
        synsets[row, 0] = (np.array([[id_]], dtype=np.float64), wnid, f"class {wnid}",
                           np.array([[1300]], dtype=np.float64))
    os.makedirs(f"{out}/devkit/data")
    scipy.io.savemat(f"{out}/devkit/data/meta.mat", {"synsets": synsets}, do_compression=True)
    with open(f"{out}/devkit/data/ILSVRC2012_validation_ground_truth.txt", "w") as f:
        f.write("".join(f"{ids[WNIDS[i % 3]]}\n" for i in range(1, 8)))


if __name__ == "__main__":
    main()
