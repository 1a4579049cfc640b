"""The planner's text report: parameters, memory, activations, FLOPs, the verdict, suggestions."""

from __future__ import annotations

from megavl.planning.activations import vision_budget
from megavl.planning.capacity import Plan
from megavl.planning.flops import FORMULAS
from megavl.planning.hardware import GIB
from megavl.planning.memory import assumptions
from megavl.planning.parameters import COMPONENTS, model_parameters


def _gib(n: float) -> str:
    """GiB, or MiB for the small models where GiB would round to zero."""
    return f"{n / GIB:8.2f} GiB" if n >= GIB / 10 or n == 0 else f"{n / 2**20:8.2f} MiB"


def describe_layout(plan: Plan) -> str:
    p = plan.config.parallel
    world, model_parallel = plan.cluster.world_size, p.tensor * p.pipeline * p.context
    dp = world // model_parallel if model_parallel >= 1 and world % model_parallel == 0 else "?"
    text = (f"TP {p.tensor} x PP {p.pipeline} x DP {dp} (EP {p.expert}, expert TP "
            f"{p.expert_tensor}, SP {'on' if p.sequence_parallel else 'off'}), distributed optimizer "
            f"{'on' if p.distributed_optimizer else 'off'}")
    if p.pipeline > 1:
        first = p.first_stage_lm_layers
        text += f", first stage LM layers {first if first is not None else 'even split'}"
    return text


def parameter_lines(plan: Plan) -> list[str]:
    counts = model_parameters(plan.config)
    moe = plan.config.model.lm.moe
    lines = ["1. parameters (the same formulas as pretrain_vlm.py --dry-run)",
             f"   {'component':<16}{'total':>17}{'active per token':>20}"]
    for name in COMPONENTS:
        lines.append(f"   {name:<16}{counts[name].total:>17,d}{counts[name].active:>20,d}")
    lines.append(f"   {'total':<16}{sum(c.total for c in counts.values()):>17,d}"
                 f"{sum(c.active for c in counts.values()):>20,d}")
    if moe.num_experts:
        lines.append(f"   active: an LM token passes through its top-{moe.top_k} of {moe.num_experts} experts; "
                     "the vision tower and adapter run on image patches only")
    return lines


def memory_lines(plan: Plan) -> list[str]:
    worst = plan.most_loaded
    p = plan.config.parallel
    where = f"pipeline stage {worst.stage} of {p.pipeline}" if p.pipeline > 1 else "every GPU (one pipeline stage)"
    params = worst.params
    lines = [f"2. memory per GPU, most loaded: {where}",
             f"   parameters held  {params.total:,d} ({params.dense:,d} dense, split over TP {p.tensor}"
             + (f"; {params.expert:,d} of experts, split over EP {p.expert} x expert TP {p.expert_tensor})"
                if plan.config.model.lm.moe.num_experts else ")"),
             f"   weights         {_gib(worst.state.weights)}",
             f"   gradients       {_gib(worst.state.gradients)}",
             f"   optimizer state {_gib(worst.state.optimizer)}",
             f"   activations     {_gib(worst.activations.total)}  (section 3)",
             f"   total           {_gib(worst.total)}  of {plan.usable_bytes / GIB:.1f} GiB usable "
             f"({plan.cluster.gpu.memory_gib:.1f} GiB less a {plan.options.reserve_gib:g} GiB reserve for the "
             "CUDA context, NCCL and allocator fragmentation)"]
    if p.pipeline > 1:
        lines.append("   per stage: " + ", ".join(
            f"{s.stage}: {s.total / GIB:.1f} GiB ({s.activations.in_flight} in flight)" for s in plan.stages))
    lines.append("   assumes:")
    lines += [f"     - {line}" for line in assumptions(plan.config, plan.cluster.world_size)]
    if plan.config.model.lm.tie_embeddings and p.pipeline > 1:
        lines.append("     - tied embeddings: the first and the last stage each hold a copy, with its own state")
    return lines


def activation_lines(plan: Plan) -> list[str]:
    config, worst = plan.config, plan.most_loaded
    t, v = config.train, config.model.vision
    budget = vision_budget(config)
    merge = v.spatial_merge_size ** 2
    patches_per_microbatch = t.micro_batch_size * budget.tokens_per_pack * merge
    lines = [f"3. activations at train.seq_length {t.seq_length} x micro_batch_size {t.micro_batch_size}, "
             f"recompute {plan.options.recompute} (a planner assumption: --recompute)",
             f"   vision budget: {budget.tokens_per_pack} tokens per pack ({budget.source}) = "
             f"{patches_per_microbatch} patches per microbatch",
             f"   stage {worst.stage}, one microbatch:"]
    for name, value in worst.activations.per_microbatch.items():
        lines.append(f"     {name:<40}{_gib(value)}")
    if config.parallel.pipeline > 1:
        lines.append(f"   x {worst.activations.in_flight} microbatch(es) in flight (1F1B: stage i holds up to "
                     f"min(PP - i, {plan.microbatches} microbatches per step))")
    else:
        lines.append("   x 1 (no pipeline: one microbatch's activations at a time)")
    for name, value in worst.activations.working.items():
        lines.append(f"   + {name:<40}{_gib(value)}")
    lines.append(f"   = {_gib(worst.activations.total)}")
    lines.append("   assumes: megatron-core's local layers as megavl builds them, "
                 + ("FlexAttention (no stored mask)" if plan.options.device == "cuda" else "dense-mask SDPA")
                 + ("; balanced expert routing (k rows per token on every EP rank)"
                    if config.model.lm.moe.num_experts else "")
                 + "; each pack filled to its vision budget with images of the largest size")
    largest = plan.largest_vision_patches()
    per_image = budget.patches_per_image(config)
    pixels = largest * v.patch_size ** 2
    images = largest // per_image if per_image else 0
    room = t.micro_batch_size * t.seq_length * merge
    lines.append(f"   largest image batch: the memory left on stage 0 takes up to {largest:,d} patches per microbatch "
                 f"in the vision tower = {pixels / 1e6:,.1f} Mpixel = {images:,d} images of {per_image} patches "
                 "(the largest data.resolution gives)")
    if largest > room:
        lines.append(f"   (more than the {room:,d} patches whose tokens fit in micro_batch_size x seq_length: the "
                     "sequence, not memory, limits the images of a microbatch)")
    return lines


def flops_lines(plan: Plan) -> list[str]:
    time, config = plan.time, plan.config
    f = time.flops
    world = plan.cluster.world_size
    lines = ["4. FLOPs per step and speed"] + [f"   {line}" for line in FORMULAS]
    lines += [
        f"   LM matmuls (6 N T)          {f.lm_dense:12.4g} FLOP  ({f.tokens:,d} tokens per step)",
        f"   LM attention                {f.lm_attention:12.4g} FLOP",
        f"   vision tower + adapter      {f.vision_dense:12.4g} FLOP  ({f.vision_tokens:,d} vision tokens per step)",
        f"   vision attention            {f.vision_attention:12.4g} FLOP",
    ]
    if f.recompute:
        lines.append(f"   recomputation (hardware)    {f.recompute:12.4g} FLOP")
    lines += [
        f"   total                       {f.hardware:12.4g} FLOP per step",
        f"   at MFU {plan.options.mfu:g} of {plan.cluster.gpu.peak_bf16_dense_flops / 1e12:.0f} TFLOP/s x {world} GPUs"
        f"{f', pipeline bubble +{time.bubble:.0%}' if time.bubble else ''}: step time {time.seconds:.3g} s, "
        f"{time.tokens_per_second:,.0f} tokens/s ({time.tokens_per_second / world:,.0f} per GPU; LM positions, "
        "image tokens included), "
        f"{config.train.steps * time.seconds / 3600:,.3g} h for train.steps = {config.train.steps:,d}",
    ]
    return lines


def plan_report(plan: Plan, title: str) -> list[str]:
    lines = [f"capacity plan: {title}", f"cluster: {plan.cluster.describe()}",
             f"layout: {describe_layout(plan)}"]
    if not plan.valid:
        lines += ["", "REFUSED: the layout cannot run on this cluster:"] + [f"  - {p}" for p in plan.problems]
        return lines
    lines[-1] += f"; {plan.microbatches} microbatch(es) per step"
    for section in (parameter_lines, memory_lines, activation_lines, flops_lines):
        lines += [""] + section(plan)
    lines.append("")
    if plan.fits:
        lines.append(f"FITS: {(plan.usable_bytes - plan.most_loaded.total) / GIB:.1f} GiB left on the most loaded GPU")
    else:
        lines.append("REFUSED: does not fit in GPU memory:")
        lines += [f"  - {reason}" for reason in plan.memory_refusals()]
    return lines


def suggestion_lines(plans: list[Plan], limit: int) -> list[str]:
    if not plans:
        return ["suggestions: no layout of this model fits this cluster"]
    lines = [f"suggestions: {len(plans)} layout(s) fit; best first (step time, then fewest model-parallel GPUs, "
             "then smallest EP, then memory)",
             f"   {'TP':>3} {'PP':>3} {'EP':>3} {'DP':>5} {'first':>6} {'mb/step':>8} {'GiB/GPU':>8} {'left':>7} "
             f"{'step s':>7} {'tokens/s':>11}  --set"]
    for plan in plans[:limit]:
        p = plan.config.parallel
        first = p.first_stage_lm_layers if p.first_stage_lm_layers is not None else "-"
        overrides = (f"parallel.tensor={p.tensor} parallel.pipeline={p.pipeline} parallel.expert={p.expert} "
                     f"parallel.expert_tensor=1 parallel.sequence_parallel={str(p.sequence_parallel).lower()} "
                     f"parallel.first_stage_lm_layers={'null' if p.first_stage_lm_layers is None else first} "
                     "parallel.distributed_optimizer=true")
        lines.append(
            f"   {p.tensor:>3} {p.pipeline:>3} {p.expert:>3} {plan.data_parallel:>5} {first!s:>6} "
            f"{plan.microbatches:>8} {plan.most_loaded.total / GIB:>8.1f} "
            f"{(plan.usable_bytes - plan.most_loaded.total) / GIB:>7.1f} {plan.time.seconds:>7.2f} "
            f"{plan.time.tokens_per_second:>11,.0f}  {overrides}")
    if len(plans) > limit:
        lines.append(f"   ... {len(plans) - limit} more (--suggest-limit)")
    return lines
