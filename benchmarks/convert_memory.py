"""Peak memory of importing a ~1B-parameter Qwen2.5-VL checkpoint into megavl.

    python benchmarks/convert_memory.py [--workdir DIR] [--dtype bf16|fp32] [--keep]

Builds a randomly initialised Qwen2.5-VL from a config (about 1.06e9
parameters), saves it with save_pretrained, then runs
`tools/convert_from_hf.py --no-verify` in a fresh process and prints that
process's peak resident set size (resource.getrusage) next to the size of the
weights. Each step runs in its own process, so the numbers do not mix.
"""

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def model_config():
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=12,
            num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
            rope_parameters=dict(rope_type="default", mrope_section=[16, 24, 24], rope_theta=1e6),
        ),
        vision_config=dict(
            depth=12, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=1536,
            window_size=112, fullatt_block_indexes=[3, 7, 11],
        ),
        tie_word_embeddings=True,
    )


def make_model(folder: str, dtype: str) -> None:
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(model_config())
    model.to(torch.bfloat16 if dtype == "bf16" else torch.float32)
    model.save_pretrained(folder)
    print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e9:.3f}e9")


def convert(hf: str, out: str) -> None:
    sys.path.insert(0, ROOT)
    from tools.convert_from_hf import main

    start = time.perf_counter()
    rc = main(["--hf", hf, "--out", out, "--no-verify"])
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB -> GiB
    helpers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    print(f"convert: exit {rc}, {seconds:.1f} s, peak RSS {peak:.2f} GiB (largest helper process {helpers:.2f} GiB)")
    sys.exit(rc)


def folder_size(folder: str) -> float:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="where the checkpoints go (default: a temporary folder)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="dtype of the saved model")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    parser.add_argument("--make-model", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--convert", nargs=2, metavar=("HF", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make_model:
        return make_model(args.make_model, args.dtype)
    if args.convert:
        return convert(*args.convert)

    workdir = args.workdir or tempfile.mkdtemp(prefix="convert_memory_")
    hf, out = os.path.join(workdir, "hf"), os.path.join(workdir, "megavl")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    try:
        subprocess.run([sys.executable, __file__, "--make-model", hf, "--dtype", args.dtype], check=True, env=env)
        print(f"Hugging Face checkpoint: {folder_size(hf):.2f} GiB ({args.dtype}) in {hf}")
        subprocess.run([sys.executable, __file__, "--convert", hf, out], check=True, env=env)
        print(f"megavl checkpoint: {folder_size(out):.2f} GiB in {out}")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
