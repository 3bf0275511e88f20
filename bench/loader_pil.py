"""The official kind of image pipeline, for bench/loader.rs to compare against.

PIL open -> convert('RGB') -> Resize(S) (shorter side, bilinear) -> CenterCrop(S) -> to float CHW
in [0, 1] -> normalise with the ImageNet mean/std, as torchvision's transforms do on PIL images.
Each worker process builds whole episodes (np.stack of its images), like a DataLoader worker
building a batch. Workers return only the shape, so inter-process transfer is NOT counted
(this favours PIL). Usage:

    python bench/loader_pil.py LIST_FILE SIZE WORKERS PER_EPISODE REPEATS

LIST_FILE has one image path per line, episodes back to back. Prints one JSON line.

    python bench/loader_pil.py --stages LIST_FILE SIZE REPEATS

instead times the stages of `load` in this process, in ms per image (median over REPEATS passes
over the files): open + decode + convert('RGB'), resize + crop, and the NumPy part.
"""
import json
import sys
import time
from multiprocessing import Pool

import numpy as np
import PIL
from PIL import Image

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(3, 1, 1)


def load(path, s):
    img = Image.open(path).convert("RGB")
    w, h = img.size
    # torchvision Resize(s): shorter side to s, longer side int(s * long / short)
    nw, nh = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
    img = img.resize((nw, nh), Image.BILINEAR)
    left, top = int(round((nw - s) / 2.0)), int(round((nh - s) / 2.0))
    img = img.crop((left, top, left + s, top + s))
    x = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0  # ToTensor
    return (x - MEAN) / STD  # Normalize


def episode(args):
    paths, s = args
    return np.stack([load(p, s) for p in paths]).shape


def stages(list_file, s, repeats):
    paths = [l.strip() for l in open(list_file) if l.strip()]
    for p in paths[:4]:  # warm-up
        load(p, s)
    passes = []
    for _ in range(repeats):
        t = [0.0, 0.0, 0.0]
        for path in paths:
            t0 = time.perf_counter()
            img = Image.open(path).convert("RGB")
            t1 = time.perf_counter()
            w, h = img.size
            nw, nh = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
            img = img.resize((nw, nh), Image.BILINEAR)
            left, top = int(round((nw - s) / 2.0)), int(round((nh - s) / 2.0))
            img = img.crop((left, top, left + s, top + s))
            t2 = time.perf_counter()
            x = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
            x = (x - MEAN) / STD
            t3 = time.perf_counter()
            t = [t[0] + t1 - t0, t[1] + t2 - t1, t[2] + t3 - t2]
        passes.append([1e3 * v / len(paths) for v in t])
    passes.sort(key=sum)
    d, r, n = passes[len(passes) // 2]
    print(json.dumps({"decode_ms": d, "resize_crop_ms": r, "numpy_ms": n}))


def main():
    if sys.argv[1] == "--stages":
        return stages(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    list_file, s, workers, per, repeats = sys.argv[1], *map(int, sys.argv[2:6])
    paths = [l.strip() for l in open(list_file) if l.strip()]
    episodes = [(paths[i : i + per], s) for i in range(0, len(paths), per)]
    rates = []
    with Pool(workers) as pool:
        pool.map(episode, episodes[:workers])  # warm-up: imports, page cache
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _shape in pool.imap(episode, episodes):
                pass
            rates.append(len(paths) / (time.perf_counter() - t0))
    print(json.dumps({
        "images_per_s": rates,
        "python": sys.version.split()[0],
        "pillow": PIL.__version__,
        "numpy": np.__version__,
    }))


if __name__ == "__main__":
    main()
