"""Capacity planning: will a config train on a cluster, with how much memory per GPU, how fast.

Everything is computed from the config (no model is built, no GPU is needed);
``tools/plan.py`` is the command line. One module per question:

* ``hardware``: the GPUs (peak bf16 dense throughput, memory);
* ``parameters``: where each parameter lives in a layout, per-GPU counts;
* ``memory``: weights, gradients and optimizer state per GPU;
* ``activations``: what a microbatch keeps for backward, per pipeline stage;
* ``flops``: FLOPs per step and the step time at a stated MFU;
* ``capacity``: one plan (validation, every stage, the verdict);
* ``layouts``: the alternative layouts that fit, best first;
* ``report``: the text the tool prints.
"""

from megavl.planning.capacity import Plan, PlanOptions, make_plan
from megavl.planning.hardware import GPUS, Cluster, gpu_by_name
from megavl.planning.layouts import suggest

__all__ = ["GPUS", "Cluster", "Plan", "PlanOptions", "gpu_by_name", "make_plan", "suggest"]
