"""`scripts/bench import`: ImageNet's release layout (a tar of per-synset tars) of 20,000
real-photo JPEGs (the data benchmark's corpus: 200 photos, each in 100 synsets under its own
name), sharded by `ladder dataset import` (every core) and by webdataset's ShardWriter reading
the same tars with Python's tarfile (the way people shard in Python), in alternating runs;
beside a plain sequential copy of the same archive (cp, then fsync). Prints images/s and
MB/s of each and the ratios; goal: Ladder >= 3x webdataset's images/s. The same archive
gzipped (level 6, gzip's default) is imported by both too, each streaming it (Ladder lists it in
one pass and writes in a second; Python reads it with tarfile's stream mode `r|gz`), beside a
plain `gzip -dc` of it to a file (what the import needed before it read .tar.gz).

usage: import.py LADDER_BINARY WORK_DIR
"""
import gzip
import io
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time

import webdataset as wds

SYNSETS = 100
PHOTOS = 200
ROUNDS = int(os.environ.get("LADDER_BENCH_ROUNDS", "3"))
GOAL = 3.0


def make_archive(work, here):
    corpus = f"{work}/corpus"
    os.makedirs(corpus, exist_ok=True)
    subprocess.run([sys.executable, f"{here}/data_corpus.py", corpus, str(PHOTOS)], check=True)
    photos = [open(f"{corpus}/{name}", "rb").read() for name in sorted(os.listdir(corpus))]
    archive = f"{work}/train.tar"
    with tarfile.open(archive, "w", format=tarfile.USTAR_FORMAT) as outer:
        for s in range(SYNSETS):
            wnid = f"n{1440764 + s:08d}"
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for i, data in enumerate(photos):
                    info = tarfile.TarInfo(f"{wnid}_{i}.JPEG")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
            info = tarfile.TarInfo(f"winter21_whole/{wnid}.tar")
            info.size = inner.tell()
            inner.seek(0)
            outer.addfile(info, inner)
    return archive


def compress(archive):
    compressed = f"{archive}.gz"
    with open(archive, "rb") as plain, gzip.open(compressed, "wb", compresslevel=6) as out:
        shutil.copyfileobj(plain, out, 1 << 20)
    return compressed


def ladder(binary, archive, dest):
    subprocess.run([binary, "dataset", "import", archive, dest, "--held-out", "0"],
                   check=True, capture_output=True)


def webdataset_shards(archive, dest):
    """Shards as a Python user writes them: tarfile over the outer and inner tars, classes by
    sorted wnid, ShardWriter of 1,000 samples a shard."""
    os.makedirs(dest)
    with tarfile.open(archive) as outer:
        members = [m for m in outer.getmembers() if m.name.endswith(".tar")]
        classes = {m.name: i for i, m in enumerate(sorted(members, key=lambda m: m.name))}
        with wds.ShardWriter(f"{dest}/shard-%06d.tar", maxcount=1000, verbose=0) as sink:
            for member in members:
                with tarfile.open(fileobj=outer.extractfile(member)) as inner:
                    write_synset(sink, inner, classes[member.name])


def write_synset(sink, inner, label):
    for image in inner:
        if image.isfile():
            sink.write({"__key__": os.path.splitext(image.name)[0],
                        "jpg": inner.extractfile(image).read(), "cls": label})


def webdataset_streamed(compressed, dest):
    """The same from the gzipped archive, streamed (tarfile's `r|gz`): each synset tar read
    into memory as it passes. The classes, sorted wnids, come from the synset tars' names, which
    a stream gives only as it goes: listed first by a pass of its own."""
    os.makedirs(dest)
    with tarfile.open(compressed, "r|gz") as outer:
        names = sorted(m.name for m in outer if m.name.endswith(".tar"))
    classes = {name: i for i, name in enumerate(names)}
    with tarfile.open(compressed, "r|gz") as outer, \
            wds.ShardWriter(f"{dest}/shard-%06d.tar", maxcount=1000, verbose=0) as sink:
        for member in outer:
            if member.name.endswith(".tar"):
                synset = io.BytesIO(outer.extractfile(member).read())
                with tarfile.open(fileobj=synset) as inner:
                    write_synset(sink, inner, classes[member.name])


def gunzip(compressed, dest):
    os.makedirs(dest)
    target = f"{dest}/train.tar"
    with open(target, "wb") as out:
        subprocess.run(["gzip", "-dc", compressed], stdout=out, check=True)
        os.fsync(out.fileno())


def copy(archive, dest):
    os.makedirs(dest)
    target = f"{dest}/train.tar"
    shutil.copyfile(archive, target)
    with open(target, "rb") as f:
        os.fsync(f.fileno())


def timed(run, archive, dest):
    shutil.rmtree(dest, ignore_errors=True)
    start = time.perf_counter()
    run(archive, dest)
    seconds = time.perf_counter() - start
    shutil.rmtree(dest)
    return seconds


def main(binary, work):
    here = os.path.dirname(os.path.abspath(__file__))
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    archive = make_archive(work, here)
    compressed = compress(archive)
    images = SYNSETS * PHOTOS
    mb = os.path.getsize(archive) / 1e6
    runs = {"ladder": (lambda a, d: ladder(binary, a, d), archive),
            "webdataset": (webdataset_shards, archive), "copy": (copy, archive),
            "ladder .gz": (lambda a, d: ladder(binary, a, d), compressed),
            "webdataset .gz": (webdataset_streamed, compressed), "gunzip": (gunzip, compressed)}
    seconds = {name: [] for name in runs}
    for _ in range(ROUNDS):
        for name, (run, source) in runs.items():
            seconds[name].append(timed(run, source, f"{work}/out-{name.replace(' ', '')}"))
    print(f"import: a tar of {SYNSETS} per-synset tars, {images} JPEGs, {mb:.0f} MB "
          f"({os.path.getsize(compressed) / 1e6:.0f} MB gzipped); median of {ROUNDS} "
          f"alternating runs on {os.cpu_count()} cores")
    print(f"{'':>14} {'seconds':>8} {'images/s':>9} {'MB/s':>7}")
    median = {name: statistics.median(s) for name, s in seconds.items()}
    for name, s in median.items():
        print(f"{name:>14} {s:>8.2f} {images / s:>9.0f} {mb / s:>7.0f}")
    ratio = median["webdataset"] / median["ladder"]
    print(f"ladder / webdataset: {ratio:.2f}x images/s; ladder at "
          f"{median['copy'] / median['ladder']:.2f} of a plain copy's speed")
    streamed = median["webdataset .gz"] / median["ladder .gz"]
    print(f"from the .tar.gz, ladder / webdataset: {streamed:.2f}x images/s; ladder streaming "
          f"it takes {median['ladder .gz'] / median['gunzip']:.2f}x a gunzip of it, "
          f"{median['ladder .gz'] / (median['gunzip'] + median['ladder']):.2f}x a gunzip "
          "then an import of the .tar")
    ok = ratio >= GOAL
    print(f"{'PASS' if ok else 'FAIL'} Ladder's import {ratio:.2f}x webdataset's ShardWriter "
          f"(goal: >= {GOAL}x)")
    shutil.rmtree(work)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
