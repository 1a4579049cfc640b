"""What a training step reads back from the device to the host, counted where it is asked for.

On a GPU every read of a device tensor's value (``.item()``, ``.tolist()``, ``bool()``, ``int()``,
``float()``, ``.cpu()``) waits for the queued kernels and stalls the launch queue. The CPU runs
the same code, so a torch function mode here sees each such call and where it comes from. What
megavl reads in a step is bounded: the image grids (host tensors by design, HOST_FIELDS), and the
step's loss and non-finite flag once per step after the backward; megatron's own reads (the
experts' split sizes, the gradient norm) are its business and not counted.
"""

from __future__ import annotations

import collections
import os
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

from conftest import ROOT

READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
         torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.cpu, torch.Tensor.numpy}
MEGAVL = os.path.join(str(ROOT), "megavl") + os.sep
MEGATRON = os.sep + os.path.join("megatron", "core") + os.sep

# megavl's reads in a step, by (module, function), and how often each may happen per step.
# "per image grid" ones read image_grid_thw, which stays on the host (models/inputs.py).
HOST_GRID_READS = {
    ("megavl/models/vision.py", "patch_coordinates"),
    ("megavl/models/vision.py", "window_segments"),
    ("megavl/models/vision.py", "forward"),
    ("megavl/models/vision.py", "_run_layers"),
    ("megavl/models/vision_embeddings.py", "forward"),
}
# The experts' split sizes, read where megatron's SequentialMLP reads them (VisionAwareSequentialMLP
# replaces its forward); with the alltoall dispatcher they are host tensors already.
AS_MEGATRON_READS = {("megavl/models/moe.py", "forward")}
# Value checks that run only on host tensors, i.e. on the CPU: on a GPU models.inputs.to_device
# runs them on the host copies before moving them (test_the_mask_reads_no_values_of_device_ids).
CPU_ONLY_CHECKS = {
    ("megavl/models/inputs.py", "check_image_tokens"),
    ("megavl/attention/mask.py", "_check_min"),
}
ONCE_PER_STEP = {
    ("megavl/training/step.py", "reduce_step_loss"): 1,  # the step's loss and answer tokens, one tensor
    ("megavl/training/step.py", "_all_finite"): 1,  # the step's non-finite flag, one all-reduce
}


class HostReads(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.sites = collections.Counter()
        self.megatron = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in READS:
            frame = sys._getframe(1)
            while frame is not None and not frame.f_code.co_filename.startswith(MEGAVL):
                if MEGATRON in frame.f_code.co_filename:
                    self.megatron[(frame.f_code.co_filename.rpartition(MEGATRON)[2], frame.f_code.co_name)] += 1
                    return func(*args, **(kwargs or {}))
                frame = frame.f_back
            if frame is not None:
                self.sites[(os.path.relpath(frame.f_code.co_filename, ROOT), frame.f_code.co_name)] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("config_name", ["tiny_cpu.yaml", "tiny_moe_cpu.yaml"], ids=["dense", "moe"])
def test_a_training_step_reads_back_only_host_grids_and_two_step_scalars(megatron_world, config_name):
    from megavl.config import load_config
    from megavl.data.random_samples import random_batches
    from megavl.models.build import build_model, wrap_for_training
    from megavl.training.optimizer import build_optimizer, build_scheduler
    from megavl.training.step import train_step

    config = load_config(str(ROOT / "examples" / "configs" / config_name), ["parallel.expert=1"])
    chunks = wrap_for_training(config, build_model(config))
    optimizer = build_optimizer(config, chunks)
    scheduler = build_scheduler(config, optimizer)
    microbatches = 3
    batches = random_batches(config, microbatches, seed=8)
    assert all(b["image_grid_thw"] is not None for b in batches)
    reads = HostReads()
    with reads:
        train_step(config, chunks, optimizer, scheduler, iter(batches), microbatches)
    megavl = dict(reads.sites)
    print("megavl", sorted(megavl.items()), "megatron", sorted(reads.megatron.items()))
    unexpected = {site: n for site, n in megavl.items()
                  if site not in HOST_GRID_READS | CPU_ONLY_CHECKS | AS_MEGATRON_READS and site not in ONCE_PER_STEP}
    assert not unexpected, f"reads of device values in the step: {unexpected}"
    for site, allowed in ONCE_PER_STEP.items():
        assert megavl.get(site, 0) <= allowed, f"{site}: {megavl[site]} reads per step, {allowed} expected"


def test_the_mask_reads_no_values_of_device_ids():
    """Ids on a device other than the CPU (here the meta device, which has no values to read)
    build the mask function without a read; to_device checked their host copies."""
    from megavl.attention.mask import check_id_values, vlm_mask_mod

    ids = torch.zeros(1, 8, dtype=torch.long)
    vlm_mask_mod(ids.to("meta"), ids.to("meta"), ids.to("meta"))
    with pytest.raises(ValueError, match="document_ids contains -2"):
        check_id_values(ids - 2, ids, ids)
