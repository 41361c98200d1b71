"""`scripts/bench data`: images/s per core of Ladder's data path against Pillow + torchvision
transforms, on the same ImageNet-like JPEGs, at each stage size, run alternately (A B A B) in
fresh single-threaded processes; prints the median of each and their ratio.
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROUNDS = int(os.environ.get("LADDER_BENCH_ROUNDS", "3"))
SIZES = [128, 192, 256, 300, 380]
COUNT = 200


def run(command):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["images_per_second"]


def batch_formats(binary):
    print("\nmicro-batch to a CPU tensor, microseconds per micro-batch (one thread): float32 NCHW "
          "normalized by the loader vs uint8 NHWC normalized by libtorch")
    print(f"{'size':>5} {'batch':>5} {'f32 loader':>11} {'u8 + torch':>11} {'ratio':>6}")
    for size, batch in [(128, 32), (380, 16)]:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        out = subprocess.run([binary, str(size), str(batch), "20"], check=True, capture_output=True,
                             text=True, env=env)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{size:>5} {batch:>5} {r['f32_loader_us']:>11.0f} {r['u8_torch_us']:>11.0f} "
              f"{r['u8_torch_us'] / r['f32_loader_us']:>6.2f}")


WEBP_SIZES = [128, 380]
WEBP_GOAL = 1.5


def medians(ladder, here, directory, size):
    """Ladder's and the peer's images/s on `directory` at `size`: the medians of ROUNDS
    alternating runs."""
    ours, theirs = [], []
    for _ in range(ROUNDS):
        ours.append(run([ladder, directory, str(size), "5"]))
        theirs.append(run([sys.executable, f"{here}/data_peer.py", directory, str(size), "2"]))
    return statistics.median(ours), statistics.median(theirs)


def webp(ladder, corpus, here):
    """The same photos as WebP (Pillow, quality 80), as the hub's imagenet-w21-webp-wds holds
    its images: Ladder (libwebp, cropped and scaled at decode) against Pillow's WebP decode and
    the same torchvision transforms."""
    from PIL import Image
    with tempfile.TemporaryDirectory() as webps:
        for name in sorted(os.listdir(corpus)):
            Image.open(f"{corpus}/{name}").save(f"{webps}/{name[:-4]}.webp", "WEBP", quality=80)
        total = sum(os.path.getsize(f"{webps}/{f}") for f in os.listdir(webps))
        print(f"\nWebP: the same {COUNT} photos as WebP (quality 80, "
              f"{total / COUNT / 1024:.0f} KB average), the same pipeline; median of {ROUNDS} "
              f"alternating runs; goal >= {WEBP_GOAL}x")
        print(f"{'size':>5} {'ladder':>9} {'pil+torchvision':>16} {'ratio':>6}")
        failed = False
        for size in WEBP_SIZES:
            a, b = medians(ladder, here, webps, size)
            ok = a / b >= WEBP_GOAL
            failed |= not ok
            print(f"{size:>5} {a:>9.1f} {b:>16.1f} {a / b:>6.2f}  {'PASS' if ok else 'FAIL'}")
        if failed:
            print(f"FAIL WebP: below {WEBP_GOAL}x Pillow + torchvision")


def main():
    ladder, batch_binary = sys.argv[1], sys.argv[2]
    here = os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryDirectory() as corpus:
        subprocess.run([sys.executable, f"{here}/data_corpus.py", corpus, str(COUNT)], check=True)
        total = sum(os.path.getsize(f"{corpus}/{f}") for f in os.listdir(corpus))
        print(f"data path, images/s on one core: {COUNT} JPEGs (500x375 / 375x500, quality 90, "
              f"{total / COUNT / 1024:.0f} KB average), decode + RandomResizedCrop + flip + "
              f"RandAugment(2, 9) + normalize; median of {ROUNDS} alternating runs")
        print(f"{'size':>5} {'ladder':>9} {'pil+torchvision':>16} {'ratio':>6}")
        for size in SIZES:
            a, b = medians(ladder, here, corpus, size)
            print(f"{size:>5} {a:>9.1f} {b:>16.1f} {a / b:>6.2f}")
        webp(ladder, corpus, here)
    batch_formats(batch_binary)


if __name__ == "__main__":
    main()
