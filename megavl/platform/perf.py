"""Which of megatron's performance switches (the config's ``perf`` section) a run turns on, and why.

Each switch is null (auto), true or false. Auto turns a switch on where it helps and this
machine and layout can run it; true asks for it, and a machine or layout that cannot run it
stops the run before start-up (``check_perf_platform``, or validate() where the config alone
rules it out); false turns it off. ``perf_plan`` says what was decided, for the dry run and the
start-up log. The switches: megatron's overlapped gradient reduce and parameter gather (with
the bucket size), its fused kernels (``transformer_fields``), megavl's activation recompute
(models/recompute.py), and CUDA_DEVICE_MAX_CONNECTIONS.

What the CPU runs: the overlapped gradient reduce and parameter all-gather are megatron's
asynchronous collectives, which gloo runs too (so the CPU tests can check them); auto turns
them on only on GPUs, where a backward and a collective run at the same time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megavl.config import Config, lm_layers_per_stage
from megavl.platform.features import Platform, detect, layer_backend_for


@dataclass(frozen=True)
class Switch:
    on: bool
    why: str


def uses_distributed_optimizer(config: Config) -> bool:
    # Muon's distributed form shards whole weights over plain all-reduced gradients
    # (megavl/training/muon.py), not megatron's reduce-scattered buffers.
    return config.parallel.distributed_optimizer and config.train.optimizer != "muon"


def overlap_grad_reduce(config: Config, data_parallel: int, platform: Optional[Platform] = None) -> Switch:
    asked = config.perf.overlap_grad_reduce
    if asked is not None:
        return Switch(asked, f"perf.overlap_grad_reduce = {str(asked).lower()}")
    if config.perf.overlap_param_gather:
        return Switch(True, "auto: on, as perf.overlap_param_gather = true needs it")
    platform = platform or detect()
    if not platform.cuda:
        return Switch(False, "auto: off without a GPU (a CPU runs the backward and the collectives in turn)")
    if data_parallel == 1 and config.parallel.expert == 1:
        return Switch(False, "auto: off with one data-parallel rank (nothing to reduce)")
    return Switch(True, "auto: on, each gradient bucket is reduced while the backward goes on")


def overlap_param_gather(config: Config, data_parallel: int, platform: Optional[Platform] = None) -> Switch:
    asked = config.perf.overlap_param_gather
    if asked is not None:
        return Switch(asked, f"perf.overlap_param_gather = {str(asked).lower()}")
    if not uses_distributed_optimizer(config):
        return Switch(False, "auto: off, the parameters are not sharded (no distributed optimizer)")
    if not overlap_grad_reduce(config, data_parallel, platform).on:
        return Switch(False, "auto: off, as the gradient reduce is not overlapped")
    return Switch(True, "auto: on, each bucket's updated parameters are gathered while the next forward goes on")


def perf_problems(config: Config) -> list[str]:
    """What is wrong with the perf section whatever the machine (config/checks.py reports these)."""
    p = config.perf
    problems = []
    if p.bucket_size is not None and p.bucket_size <= 0:
        problems.append(f"perf.bucket_size = {p.bucket_size}: must be a positive number of parameters, "
                        "or null for megatron's default")
    recomputes = [f"perf.recompute_{tower} = full" for tower in ("lm", "vision")
                  if getattr(p, f"recompute_{tower}") == "full"]
    if p.recompute_lm_layers is not None:
        if p.recompute_lm != "full":
            problems.append(f"perf.recompute_lm_layers = {p.recompute_lm_layers}: counts the recomputed LM layers "
                            f"of perf.recompute_lm = full, but perf.recompute_lm = {p.recompute_lm}")
        elif p.recompute_lm_layers < 1:
            problems.append(f"perf.recompute_lm_layers = {p.recompute_lm_layers}: must be >= 1 (null: every layer)")
        else:
            fewest = min(lm_layers_per_stage(config))
            if p.recompute_lm_layers > fewest:
                problems.append(f"perf.recompute_lm_layers = {p.recompute_lm_layers}: a pipeline stage has only "
                                f"{fewest} LM layers (per stage: {lm_layers_per_stage(config)}); null recomputes all")
    if recomputes and config.train.dropout > 0:
        problems.append(f"{' and '.join(recomputes)}: needs train.dropout = 0 (it is {config.train.dropout}); "
                        "the recompute would draw other dropout masks in tensor-parallel regions")
    if recomputes and config.train.fp8 is not None:
        problems.append(f"{' and '.join(recomputes)}: not with train.fp8 = {config.train.fp8} (a recomputed FP8 "
                        "forward would record its amaxes twice); leave train.fp8 unset or the recompute off")
    if p.overlap_param_gather:
        if not uses_distributed_optimizer(config):
            why = ("train.optimizer = muon keeps whole weights" if config.parallel.distributed_optimizer
                   else "parallel.distributed_optimizer = false")
            problems.append(f"perf.overlap_param_gather = true: needs the distributed optimizer, which shards "
                            f"the parameters it gathers ({why})")
        if p.overlap_grad_reduce is False:
            problems.append("perf.overlap_param_gather = true: needs perf.overlap_grad_reduce (true or null), "
                            "megatron overlaps the gather only together with the reduce")
    return problems


def perf_plan(config: Config, data_parallel: int, platform: Optional[Platform] = None) -> str:
    """One line per switch: on or off and why."""
    lines = ["performance switches (perf):"]
    for name, switch in (("overlap_grad_reduce", overlap_grad_reduce(config, data_parallel, platform)),
                         ("overlap_param_gather", overlap_param_gather(config, data_parallel, platform))):
        lines.append(f"  {name:<28} {'on' if switch.on else 'off':<4} {switch.why}")
    for name, switch in fusions(config, platform).items():
        lines.append(f"  {name:<28} {'on' if switch.on else 'off':<4} {switch.why}")
    p = config.perf
    lines.append(f"  {'bucket_size':<28} {p.bucket_size if p.bucket_size else 'max(40M, 1M x DP) parameters (megatron)'}")
    lm_layers = "every LM layer" if p.recompute_lm_layers is None else f"the first {p.recompute_lm_layers} LM layers of each stage"
    lines.append(f"  {'recompute_lm':<28} {p.recompute_lm:<4} " + (lm_layers if p.recompute_lm == "full" else "activations kept"))
    lines.append(f"  {'recompute_vision':<28} {p.recompute_vision:<4} "
                 + ("every vision layer" if p.recompute_vision == "full" else "activations kept"))
    return "\n".join(lines)


# -- fused kernels ----------------------------------------------------------

def _apex_wgrad_kernel() -> bool:
    try:
        import fused_weight_gradient_mlp_cuda  # noqa: F401
    except ImportError:
        return False
    return True


def _fusion(config: Config, name: str, blocker: Optional[str]) -> Switch:
    """A fused kernel's switch; blocker: why this machine and config cannot run it, or None."""
    asked = getattr(config.perf, name)
    if asked is not None:
        return Switch(asked, f"perf.{name} = {str(asked).lower()}")
    if blocker is not None:
        return Switch(False, f"auto: off, {blocker}")
    return Switch(True, "auto: on")


def fusion_blockers(config: Config, platform: Optional[Platform] = None,
                    asked: bool = False) -> dict[str, Optional[str]]:
    """For each fused kernel, why this machine and config cannot run it (None: it can); asked:
    why it cannot run when asked for (true), where auto is more careful (the CPU)."""
    platform = platform or detect()
    lm = config.model.lm
    no_gpu = None if platform.cuda else "it needs a CUDA GPU"
    te = None if platform.transformer_engine else "it needs Transformer Engine, which is not installed (or not usable)"
    layers = layer_backend_for(config, platform)[0]
    if no_gpu:
        wgrad = no_gpu
    elif layers == "te" or _apex_wgrad_kernel():
        wgrad = None
    else:
        wgrad = ("the model's local linears need apex's fused_weight_gradient_mlp_cuda, which is not installed "
                 "(Transformer Engine layers have their own)")
    rope = no_gpu or te or (None if lm.rope == "1d" else
                            f"model.lm.rope = {lm.rope}: TE's fused RoPE takes one position table for the whole "
                            "batch, multimodal RoPE has one per row")
    permute = no_gpu or te or (None if lm.moe.num_experts else "the LM has no experts")
    # Transformer Engine's fused cross-entropy, or megatron's own (torch.compile'd, so it runs on
    # the CPU too), which returns the logits' gradient in bf16 whatever the training dtype.
    cross_entropy = None if (platform.transformer_engine or config.train.dtype == "bf16") else (
        f"megatron's own fused cross-entropy (Transformer Engine's is not installed) returns the logits' "
        f"gradient in bf16, and train.dtype = {config.train.dtype}")
    return {
        "gradient_accumulation_fusion": wgrad,
        "bias_activation_fusion": no_gpu,
        "rope_fusion": rope,
        "moe_permute_fusion": permute,
        "cross_entropy_fusion": cross_entropy if asked else (no_gpu or cross_entropy),
    }


def fusions(config: Config, platform: Optional[Platform] = None) -> dict[str, Switch]:
    return {name: _fusion(config, name, why) for name, why in fusion_blockers(config, platform).items()}


def fusion_platform_problems(config: Config, platform: Optional[Platform] = None) -> list[str]:
    """The fused kernels asked for (true) that this machine or config cannot run."""
    problems = []
    for name, why in fusion_blockers(config, platform, asked=True).items():
        if getattr(config.perf, name) and why is not None:
            problems.append(f"perf.{name} = true: {why}; set it to null (auto) or false")
    return problems


def check_perf_platform(config: Config, platform: Optional[Platform] = None) -> None:
    """Stops a run that asks for a fused kernel this machine cannot run, before anything is built."""
    from megavl.config import ConfigError

    problems = fusion_platform_problems(config, platform)
    if problems:
        raise ConfigError("the perf settings cannot run here:\n  - " + "\n  - ".join(problems))


def transformer_fields(config: Config, tower: str, platform: Optional[Platform] = None) -> dict:
    """megatron TransformerConfig fields of the fused kernels, for the "lm" or the "vision" config."""
    on = {name: switch.on for name, switch in fusions(config, platform).items()}
    platform = platform or detect()
    fields = dict(gradient_accumulation_fusion=on["gradient_accumulation_fusion"])
    if tower == "lm":
        fields.update(
            # megatron fuses the bias with SwiGLU (the LM's MLPs are gated SiLU).
            bias_activation_fusion=on["bias_activation_fusion"],
            apply_rope_fusion=on["rope_fusion"],
            cross_entropy_loss_fusion=on["cross_entropy_fusion"],
            cross_entropy_fusion_impl="te" if platform.transformer_engine else "native",
        )
        if config.model.lm.moe.num_experts:
            fields["moe_permute_fusion"] = on["moe_permute_fusion"]
    return fields


def cuda_connection_setting(config: Config, environ: dict) -> Optional[str]:
    """The CUDA_DEVICE_MAX_CONNECTIONS value the trainer sets before CUDA starts, or None.

    With tensor (or context) parallelism megatron wants one hardware queue per device, so that
    each layer's collective starts in the order it was issued and overlaps the GEMMs that follow
    instead of waiting behind them. A value the user set is kept.
    """
    p = config.parallel
    if "CUDA_DEVICE_MAX_CONNECTIONS" in environ or (p.tensor == 1 and p.context == 1):
        return None
    return "1"
