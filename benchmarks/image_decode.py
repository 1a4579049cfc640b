"""Prints images/s for decode + resize + tile per image back end on this machine.

    python benchmarks/image_decode.py
    python benchmarks/image_decode.py --images 128 --repeats 3

The images are photo-like JPEGs of 0.3 to 4 MP made in memory with a fixed
seed. Two plans: native (Qwen2-VL's size at max_pixels ~1 MP, one part) and
documents (the image resized to a 3x3 grid of 448-pixel tiles, nine tiles plus
a 448x448 thumbnail). Back ends: Pillow, DALI on the CPU, and DALI with nvJPEG
("mixed") when a GPU is present. Each figure is the best of --repeats passes
over all images (render_batch), after a short warm-up.
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def tiling_plan(grid: int = 3, tile: int = 448):
    from megavl.data.resolution import ImagePart, ImagePlan

    side = grid * tile
    parts = [
        ImagePart(f"<tile_{r + 1}_{c + 1}>", (r * tile, c * tile, tile, tile)) for r in range(grid) for c in range(grid)
    ]
    parts.append(ImagePart("<tile_global>", None))
    return ImagePlan(resize_to=(side, side), canvas=(side, side), parts=parts, thumbnail_size=(tile, tile))


def make_images(count: int, seed: int) -> list[tuple[bytes, int, int]]:
    from megavl.data.image_backends import sample_jpeg

    rng = np.random.default_rng(seed)
    images = []
    for i in range(count):
        megapixels = rng.uniform(0.3, 4.0)
        aspect = rng.uniform(0.5, 2.0)  # width / height
        height = max(28, int(round((megapixels * 1e6 / aspect) ** 0.5)))
        width = max(28, int(round(height * aspect)))
        images.append((sample_jpeg(height, width, seed=seed * 100_000 + i), height, width))
    return images


def available_backends(batch_size: int, threads: int):
    import torch

    from megavl.data.dali_backend import DaliBackend
    from megavl.data.image_backends import dali_available
    from megavl.data.pillow_backend import PillowBackend

    backends = [PillowBackend()]
    if dali_available():
        backends.append(DaliBackend("cpu", batch_size=batch_size, num_threads=threads))
        if torch.cuda.is_available():
            backends.append(DaliBackend("gpu", batch_size=batch_size, num_threads=threads))
    else:
        print("DALI is not installed (pip install 'megavl[dali]'): Pillow only")
    return backends


def images_per_second(backend, items, repeats: int) -> float:
    from megavl.data.image_backends import time_backend

    return 1.0 / time_backend(backend, items, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16, help="DALI pipeline batch size")
    parser.add_argument("--threads", type=int, default=0, help="DALI CPU threads (0: up to 4, as many as cores)")
    args = parser.parse_args()

    from megavl.data.image_backends import native_plan

    started = time.perf_counter()
    images = make_images(args.images, args.seed)
    megapixels = [h * w / 1e6 for _, h, w in images]
    print(
        f"{len(images)} JPEGs, {min(megapixels):.1f}-{max(megapixels):.1f} MP (mean {np.mean(megapixels):.2f}), "
        f"made in {time.perf_counter() - started:.1f} s; {len(os.sched_getaffinity(0))} CPU cores"
    )
    plans = {
        "native <=1MP": [(data, native_plan(h, w)) for data, h, w in images],
        "3x3 tiles 448 + thumb": [(data, tiling_plan()) for data, _, _ in images],
    }
    backends = available_backends(args.batch_size, args.threads or None)
    print(f"{'back end':<10} " + " ".join(f"{name:>24}" for name in plans) + "   (images/s)")
    for backend in backends:
        rates = [images_per_second(backend, items, args.repeats) for items in plans.values()]
        print(f"{backend.name:<10} " + " ".join(f"{rate:>24.1f}" for rate in rates))


if __name__ == "__main__":
    main()
