"""Prints how fast the training data loader delivers microbatches on this machine.

    python benchmarks/loader_throughput.py [--samples 2000] [--microbatches 60] [--workers 0 2]
                                           [--decode-in loader trainer]

Generates the synthetic corpus (tools/make_synthetic_data.py's generator) in a
temporary folder, then reads it through EnergonDataStream, the loader
pretrain_vlm.py uses: energon reading and shuffling, records planned and
packed, images decoded by each back end, rows collated. Reports records/s,
tokens/s (real tokens in the delivered rows), packing efficiency and the time
to the first microbatch (energon fills its packing buffer first), per back end
and number of worker processes, with examples/configs/tiny_cpu.yaml at a
larger image size (data.resolution.max_pixels, default 1 MP), seq_length 4096
and up to 64 images per pack. ``--decode-in trainer`` decodes after the loader, in
this process (data.decode_images_in; on a GPU, DALI's nvJPEG), as pretrain_vlm.py does.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def measure(data_dir: str, backend: str, workers: int, microbatches: int, max_pixels: int,
            decode_in: str = "loader") -> dict:
    import torch

    from megavl.config import load_config
    from megavl.data.energon_stream import EnergonDataStream
    from megavl.data.tokenizer import load_tokenizer
    from megavl.data.trainer_decode import TrainerImageDecoder

    config = load_config(os.path.join(os.path.dirname(__file__), "..", "examples", "configs", "tiny_cpu.yaml"), [
        f"data.image_backend={backend}", f"data.num_workers={workers}", f"data.resolution.max_pixels={max_pixels}",
        "train.seq_length=4096", "train.micro_batch_size=1", "data.max_images_per_pack=64",
        f"data.decode_images_in={decode_in}",
    ])
    stream = EnergonDataStream(os.path.join(data_dir, "train"), load_tokenizer(os.path.join(data_dir, "tokenizer")),
                               config, rank=0, world_size=1, seed=0)
    decoder = TrainerImageDecoder(config) if stream.decode_in_trainer else None

    def take() -> None:
        batch = next(stream)
        if decoder is not None:
            decoder.decode(batch)
            if torch.cuda.is_available():
                torch.cuda.synchronize()

    started = time.perf_counter()
    take()
    first = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(microbatches):
        take()
    elapsed = time.perf_counter() - started
    stats = stream.stats
    stream.close()
    records = sum(stats.read.values())
    return {"first": first, "records_per_s": records / (first + elapsed), "tokens_per_s": stats.real_tokens / (first + elapsed),
            "efficiency": stats.packing_efficiency}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--microbatches", type=int, default=60)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--max-pixels", type=int, default=1003520)
    parser.add_argument("--decode-in", nargs="+", default=["loader"], choices=["loader", "trainer"])
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")

    from megavl.data.image_backends import dali_available
    from megavl.datasets.synthetic import generate

    backends = ["pillow"] + (["dali"] if dali_available() else [])
    with tempfile.TemporaryDirectory() as folder:
        generate(folder, train_samples=args.samples, val_samples=10, seed=0)
        print(f"{args.samples} synthetic records; seq_length 4096, max_pixels {args.max_pixels}; "
              f"{len(os.sched_getaffinity(0))} CPU cores")
        print(f"{'back end':<8} {'decode in':<9} {'workers':>7} {'first (s)':>9} {'records/s':>9} "
              f"{'tokens/s':>9} {'packing':>8}")
        for backend in backends:
            for place in args.decode_in:
                for workers in args.workers:
                    r = measure(folder, backend, workers, args.microbatches, args.max_pixels, place)
                    print(f"{backend:<8} {place:<9} {workers:>7} {r['first']:>9.2f} {r['records_per_s']:>9.1f} "
                          f"{r['tokens_per_s']:>9.0f} {r['efficiency']:>8.1%}")


if __name__ == "__main__":
    main()
