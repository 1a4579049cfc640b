"""One command that checks megavl's GPU path on one GPU, prints a table and writes JSON.

    python tools/gpu_selfcheck.py [--wheel megatron_core-0.16.1-....whl ...] [--json selfcheck.json]

For a machine that has torch with CUDA but not megatron-core: ``--wheel`` puts the
given wheels (megatron-core's, and any other pure-Python one megavl needs) on the
path before anything is imported, without pip or a network. Each check is one
row, pass / fail / skip with what it measured; a check that cannot run here
(no Transformer Engine, no DALI) is a skip that says why. The exit status is 1
when any check fails. On one H200 the whole run takes a few minutes.

Checks:
  platform        the GPU, torch, and which of TE, DALI, FlexAttention import
  nccl_world      a process group of one on NCCL; an all_reduce on collective_device
  train_tiny      examples/configs/tiny_cpu.yaml in bf16: 8 steps over 2 fixed batches,
                  the loss finite and falling on each batch
  train_1b        a ~1B dense VLM (24 x 1024 tower, 16 x 2048 LM, seq 4096) in bf16, the same
  flex_vs_sdpa    compiled FlexAttention with a BlockMask (packed documents, bidirectional
                  images) against SDPA with the dense mask at seq 16384, vision head dim 80
                  and LM head dim 128: outputs and q/k/v gradients, each against an fp32
                  reference, flex's error at most twice bf16 SDPA's
  te_fp8          model.layer_backend = te with train.fp8 = hybrid (delayed), 4 steps (TE only)
  te_vision_lora  vision LoRA on TE layers: not implemented (validate() refuses it)
  dali_mixed      DALI's nvJPEG decode and GPU resize against Pillow (DALI only)
  cpu_checkpoint  weights saved by a CPU process (gloo, local layers, SDPA) load into the
                  model on the GPU, which gives the CPU's logits

Without CUDA it runs as a smoke test of itself on the CPU: gloo, the tiny model in fp32, flex
forward only (uncompiled, at seq 512: flex has no CPU backward) and the CPU checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "examples" / "configs" / "tiny_cpu.yaml"

# A ~1B dense VLM: a 24 x 1024 tower (head dim 64) and a 16 x 2048 LM (head dim 128, GQA 2:1).
ONE_B = [
    "model.vision.num_layers=24", "model.vision.hidden_size=1024", "model.vision.num_attention_heads=16",
    "model.vision.ffn_hidden_size=4096", "model.vision.window_size=112",
    "model.vision.full_attention_layers=[7,15,23]",
    "model.lm.num_layers=16", "model.lm.hidden_size=2048", "model.lm.num_attention_heads=16",
    "model.lm.num_query_groups=8", "model.lm.ffn_hidden_size=5632", "model.lm.mrope_section=[16,24,24]",
    "model.lm.vision_lora.mlp_rank=0", "model.lm.vision_lora.attn_rank=0",
    "train.seq_length=4096", "train.micro_batch_size=1", "train.global_batch_size=1", "train.lr=3e-4",
]
STEPS_OVERRIDES = ["train.warmup_steps=1", "train.steps=8"]


@dataclass
class Row:
    check: str
    status: str  # pass | fail | skip
    detail: str
    seconds: float = 0.0


def put_wheels_on_path(wheels: list[str]) -> None:
    """Unpacks the wheels into a temporary folder at the front of sys.path (and PYTHONPATH, for the
    CPU child process). A wheel is a zip of the package; nothing of it is executed here."""
    if not wheels:
        return
    target = Path(tempfile.mkdtemp(prefix="megavl-selfcheck-wheels-"))
    for wheel in wheels:
        if not wheel.endswith(".whl") or not os.path.isfile(wheel):
            raise SystemExit(f"--wheel {wheel!r}: not a .whl file")
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(target)
    sys.path.insert(0, str(target))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))


def tiny_config(*overrides: str):
    from megavl.config import load_config

    return load_config(str(TINY), list(overrides))


def on_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# -- checks ------------------------------------------------------------------------------------


def check_platform() -> Row:
    import torch

    from megavl.platform.features import detect

    p = detect()
    have = ", ".join(f"{name} {'yes' if ok else 'no'}" for name, ok in
                     [("TE", p.transformer_engine), ("DALI", p.dali), ("flex", p.flex_attention), ("apex", p.apex)])
    if not p.cuda:
        return Row("platform", "skip", f"no CUDA (torch {torch.__version__}); running as a CPU smoke test; {have}")
    major, minor = torch.cuda.get_device_capability()
    return Row("platform", "pass", f"{torch.cuda.get_device_name()} (sm {major}{minor}), torch {torch.__version__}, "
                                   f"CUDA {torch.version.cuda}; {have}")


def check_world() -> Row:
    import torch
    import torch.distributed as dist

    from megavl.platform.distributed import collective_device, init_distributed

    init_distributed(tiny_config())
    value = torch.tensor([3.0], device=collective_device())
    dist.all_reduce(value)
    backend = dist.get_backend()
    ok = float(value.item()) == 3.0 and backend == ("nccl" if on_cuda() else "gloo")
    return Row("nccl_world", "pass" if ok else "fail",
               f"backend {backend}, world {dist.get_world_size()}, all_reduce on {value.device}: {float(value.item())}")


def _train(config, steps: int) -> tuple[list[float], int]:
    """steps optimizer steps cycling over 2 fixed random batches; the losses and the parameter count."""
    from megavl.config import validate
    from megavl.data.random_samples import random_batches
    from megavl.models.build import build_model, wrap_for_training
    from megavl.training.optimizer import build_optimizer, build_scheduler
    from megavl.training.step import num_microbatches, train_step

    validate(config, 1)
    model = build_model(config)
    chunks = wrap_for_training(config, model)
    optimizer = build_optimizer(config, chunks)
    scheduler = build_scheduler(config, optimizer)
    per_step = num_microbatches(config, 1)
    data = random_batches(config, 2 * per_step, seed=5)
    losses = []
    for step in range(steps):
        batches = data[(step % 2) * per_step : (step % 2 + 1) * per_step]
        losses.append(train_step(config, chunks, optimizer, scheduler, iter(batches), per_step).loss)
    return losses, sum(p.numel() for p in model.parameters())


def _training_row(name: str, config, steps: int) -> Row:
    import torch

    if on_cuda():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    losses, params = _train(config, steps)
    seconds = time.perf_counter() - started
    finite = all(math.isfinite(x) for x in losses)
    # The same batch comes back every second step: its loss must be lower the second time round.
    falling = finite and losses[-2] < losses[0] and losses[-1] < losses[1]
    memory = f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if on_cuda() else ""
    detail = (f"{params / 1e6:.1f}M params, {config.train.dtype}, {steps} steps "
              f"({seconds / steps:.2f} s/step{memory}); losses " + " ".join(f"{x:.3f}" for x in losses))
    return Row(name, "pass" if falling else "fail", detail)


def check_train_tiny() -> Row:
    dtype = "bf16" if on_cuda() else "fp32"
    steps = 8 if on_cuda() else 4
    return _training_row("train_tiny", tiny_config(*STEPS_OVERRIDES, f"train.dtype={dtype}"), steps)


def check_train_1b() -> Row:
    if not on_cuda():
        return Row("train_1b", "skip", "needs a GPU (about 1.1B parameters)")
    return _training_row("train_1b", tiny_config(*ONE_B, *STEPS_OVERRIDES, "train.dtype=bf16"), 8)


def _packed_ids(seq: int, device):
    """Document, image and turn ids of one packed row: documents of varied length, each with two
    image spans, and padding at the end (what vlm_mask_mod reads)."""
    import torch

    documents = torch.full((1, seq), -1, dtype=torch.long)
    images = torch.full((1, seq), -1, dtype=torch.long)
    start, doc, image = 0, 0, 0
    lengths = [seq // 3, seq // 4, seq // 5, seq // 8]
    for length in lengths:
        documents[0, start : start + length] = doc
        for offset in (length // 10, length // 2):
            images[0, start + offset : start + offset + length // 6] = image
            image += 1
        start += length
        doc += 1
    return documents.to(device), images.to(device), torch.zeros_like(documents).to(device)


def _attention_errors(seq: int, heads: int, head_dim: int, backward: bool, compiled: bool) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import flex_attention

    from megavl.attention.mask import block_mask, dense_mask, vlm_mask_mod

    device = torch.device("cuda") if on_cuda() else torch.device("cpu")
    mask_mod = vlm_mask_mod(*_packed_ids(seq, device), bidirectional_images=True)
    blocks = block_mask(mask_mod, 1, seq, device)
    dense = dense_mask(mask_mod, 1, seq, device)
    generator = torch.Generator(device=device).manual_seed(head_dim)
    shape = (1, heads, seq, head_dim)
    q, k, v = (torch.randn(shape, device=device, generator=generator) for _ in range(3))
    grad_out = torch.randn(shape, device=device, generator=generator)
    flex = torch.compile(flex_attention) if compiled else flex_attention
    dtype = torch.bfloat16 if on_cuda() else torch.float32

    def run(fn, precision):
        inputs = [x.to(precision).requires_grad_(backward) for x in (q, k, v)]
        out = fn(*inputs)
        grads = []
        if backward:
            out.backward(grad_out.to(precision))
            grads = [x.grad.float() for x in inputs]
        return [out.float().detach(), *grads]

    reference = run(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=dense), torch.float32)
    sdpa = run(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=dense), dtype)
    flexed = run(lambda a, b, c: flex(a, b, c, block_mask=blocks), dtype)
    names = ["out", "dq", "dk", "dv"][: len(reference)]
    return {name: ((f - r).abs().max().item(), (s - r).abs().max().item())
            for name, r, s, f in zip(names, reference, sdpa, flexed)}


def check_flex() -> Row:
    from megavl.platform.features import detect

    if not detect().flex_attention:
        return Row("flex_vs_sdpa", "fail", "torch.nn.attention.flex_attention is not available")
    cuda = on_cuda()
    seq = 16384 if cuda else 512
    parts, ok = [], True
    for label, heads, head_dim in [("vision", 16, 80), ("lm", 16, 128)]:
        errors = _attention_errors(seq, heads, head_dim, backward=cuda, compiled=cuda)
        for name, (flex_error, sdpa_error) in errors.items():
            # bf16 SDPA's own error bounds what flex may be off by; on the CPU both run in fp32.
            bound = 2 * sdpa_error + (1e-2 if cuda else 1e-4)
            ok &= flex_error <= bound
            parts.append(f"{label} d{head_dim} {name} {flex_error:.2e} (sdpa {sdpa_error:.2e})")
    how = "compiled, forward and backward" if cuda else "uncompiled, forward only (no flex backward on the CPU)"
    return Row("flex_vs_sdpa", "pass" if ok else "fail", f"seq {seq}, {how}; max |error| vs fp32: " + "; ".join(parts))


def check_te_fp8() -> Row:
    from megavl.platform.features import detect

    p = detect()
    if not (p.cuda and p.transformer_engine):
        return Row("te_fp8", "skip", "Transformer Engine is not importable here" if p.cuda else "needs a GPU")
    # tiny_cpu's MLP width 344 is no multiple of 16, which FP8 GEMMs need (validate() says so).
    config = tiny_config(*STEPS_OVERRIDES, "train.dtype=bf16", "model.layer_backend=te", "model.lm.ffn_hidden_size=352",
                         "model.lm.vision_lora.mlp_rank=0", "model.lm.vision_lora.attn_rank=0",
                         "train.fp8=hybrid", "train.fp8_recipe=delayed")
    return _training_row("te_fp8", config, 4)


def check_te_lora() -> Row:
    return Row("te_vision_lora", "skip", "not implemented: vision LoRA is built on megatron-core's local linears; "
                                         "validate() refuses model.layer_backend = te with LoRA ranks > 0")


def check_dali() -> Row:
    import torch

    from megavl.platform.features import detect

    p = detect()
    if not (p.cuda and p.dali):
        return Row("dali_mixed", "skip", "DALI is not importable here" if p.cuda else "needs a GPU")
    from megavl.data.dali_backend import DaliBackend
    from megavl.data.image_backends import native_plan, sample_jpeg
    from megavl.data.pillow_backend import PillowBackend

    items = [(sample_jpeg(h, w, seed), native_plan(h, w)) for seed, (h, w) in enumerate([(768, 1280), (1200, 1600)])]
    gpu = DaliBackend("gpu").render_batch(items)
    cpu = PillowBackend().render_batch(items)
    worst = 0.0
    for (_, plan), gpu_parts, cpu_parts in zip(items, gpu, cpu):
        (_, a), (_, b) = gpu_parts[0], cpu_parts[0]
        # Normalised values back to 8-bit levels: times the plan's std and 255.
        std = torch.tensor(plan.std).view(3, 1, 1)
        worst = max(worst, ((a.cpu() - b).abs() * std * 255).mean().item())
    on_gpu = all(parts[0][1].is_cuda for parts in gpu)
    return Row("dali_mixed", "pass" if on_gpu and worst < 1.0 else "fail",
               f"{len(items)} JPEGs decoded on {'cuda' if on_gpu else 'cpu'}; mean |dali - pillow| "
               f"{worst:.2f} of one 8-bit level")


def _fixed_batch(config):
    from megavl.data.random_samples import random_batches

    return random_batches(config, 1, seed=9)[0]


def _logits(model, config, batch):
    import torch

    from megavl.models import inputs
    from megavl.platform.features import detect

    platform = detect()
    model.eval()
    with torch.no_grad():
        moved = inputs.to_device(batch, config, platform.device)
        return inputs.forward(model, moved, config, platform, with_labels=False, gather_logits=True).float().cpu()


def write_cpu_checkpoint(folder: str) -> None:
    """The CPU side of cpu_checkpoint, run in a child process without CUDA."""
    import torch

    from megavl.models.build import build_model
    from megavl.platform.distributed import init_distributed
    from megavl.training.checkpoint import save_model_weights

    config = tiny_config("train.seed=77")
    init_distributed(config)
    model = build_model(config)
    save_model_weights(model, os.path.join(folder, "weights"))
    torch.save({"logits": _logits(model, config, _fixed_batch(config))}, os.path.join(folder, "logits.pt"))


def check_cpu_checkpoint() -> Row:
    import torch

    from megavl.models.build import build_model
    from megavl.training.checkpoint import load_model_weights

    with tempfile.TemporaryDirectory() as folder:
        env = {k: v for k, v in os.environ.items()
               if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env["CUDA_VISIBLE_DEVICES"] = ""
        child = subprocess.run([sys.executable, __file__, "--write-cpu-checkpoint", folder], env=env,
                               capture_output=True, text=True, timeout=300, cwd=ROOT)
        if child.returncode != 0:
            return Row("cpu_checkpoint", "fail", f"the CPU process failed: {child.stderr.strip()[-400:]}")
        expected = torch.load(os.path.join(folder, "logits.pt"), weights_only=True)["logits"]
        config = tiny_config()  # another seed: only the loaded weights can make the logits agree
        model = build_model(config)
        load_model_weights(model, os.path.join(folder, "weights"))
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            logits = _logits(model, config, _fixed_batch(config))
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
    error = (logits - expected).abs().max().item()
    scale = expected.abs().max().item()
    ok = logits.shape == expected.shape and error <= 1e-4 * max(scale, 1.0)
    where = "the GPU" if on_cuda() else "this CPU"
    return Row("cpu_checkpoint", "pass" if ok else "fail",
               f"tiny model saved on the CPU, loaded on {where}: max |logit difference| {error:.2e} (logits up to {scale:.1f})")


CHECKS = [check_platform, check_world, check_train_tiny, check_train_1b, check_flex, check_te_fp8, check_te_lora,
          check_dali, check_cpu_checkpoint]


def run_checks() -> list[Row]:
    rows = []
    for check in CHECKS:
        started = time.perf_counter()
        try:
            row = check()
        except Exception as e:  # noqa: BLE001 - a failing check is a row, and the others still run
            name = check.__name__.removeprefix("check_")
            row = Row(name, "fail", f"{type(e).__name__}: {e}".splitlines()[0][:300])
            traceback.print_exc()
        row.seconds = round(time.perf_counter() - started, 1)
        rows.append(row)
        print(f"{row.check}: {row.status} ({row.seconds:.1f} s)", file=sys.stderr, flush=True)
    return rows


def print_table(rows: list[Row]) -> None:
    width = max(len(r.check) for r in rows)
    print(f"{'check':<{width}}  {'status':<6}  {'s':>6}  detail")
    for r in rows:
        print(f"{r.check:<{width}}  {r.status:<6}  {r.seconds:>6.1f}  {r.detail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheel", action="append", default=[], help="a wheel to put on the path (repeatable)")
    parser.add_argument("--json", default="gpu_selfcheck.json", help="where the results are written")
    parser.add_argument("--write-cpu-checkpoint", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    put_wheels_on_path(args.wheel)
    if args.write_cpu_checkpoint:
        write_cpu_checkpoint(args.write_cpu_checkpoint)
        return
    rows = run_checks()
    print_table(rows)
    with open(args.json, "w") as f:
        json.dump({"rows": [asdict(r) for r in rows]}, f, indent=2)
    print(f"results: {os.path.abspath(args.json)}")
    from megavl.platform.distributed import shutdown

    shutdown()
    sys.exit(1 if any(r.status == "fail" for r in rows) else 0)


if __name__ == "__main__":
    main()
