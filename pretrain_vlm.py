"""Pretrains a vision-language model. Launch with torchrun; reads top to bottom.

    torchrun --nproc-per-node N pretrain_vlm.py --config FILE [--set key=value ...] [--dry-run]

The same script trains the tiny CPU model and the multi-node GPU model; only
the config and the machine differ.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings

# The trainer prints its own progress line; energon's buffer-filling bars would
# interleave with it. tqdm reads this when it is first imported.
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

# The exit status of a configuration that cannot run (the message names every problem).
EXIT_INVALID_CONFIG = 2

# megatron-core calls these collectives by their older names every step; the
# deprecation is torch's business with megatron, not something a user can act on.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
                        category=FutureWarning)


def parse_args() -> argparse.Namespace:
    from megavl.config import add_config_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved config, parallel layout and parameter counts, then exit")
    parser.add_argument("--world-size", type=int, default=None,
                        help="with --dry-run: plan for this many processes instead of WORLD_SIZE")
    return parser.parse_args()


def dry_run(config, world_size: int) -> None:
    """Everything here comes from the config: nothing is allocated, no process group is made."""
    from megavl.config import data_parallel_size, dump_config, lm_layers_per_stage, validate
    from megavl.models.param_count import active_language_model_parameters, total_parameter_counts
    from megavl.models.precision import fp8_platform_problems, precision_plan
    from megavl.platform.perf import fusion_platform_problems, perf_plan

    validate(config, world_size)
    p = config.parallel
    print(dump_config(config))
    print(f"parallel layout: world={world_size} = TP {p.tensor} x PP {p.pipeline} x "
          f"DP {data_parallel_size(config, world_size)} (EP {p.expert}, SP {p.sequence_parallel})")
    print(f"LM layers per pipeline stage: {lm_layers_per_stage(config)} (vision encoder on stage 0)")
    counts = total_parameter_counts(config)
    for name, count in counts.items():
        print(f"parameters {name:>15}: {count:>15,d}")
    print(f"parameters {'total':>15}: {sum(counts.values()):>15,d}")
    lm = config.model.lm
    embeddings = lm.vocab_size * lm.hidden_size * (1 if lm.tie_embeddings else 2)
    active = active_language_model_parameters(config)
    print(f"LM parameters active per token: {active:,d} ({active - embeddings:,d} without the embeddings)")
    print(describe_stage(config))
    print(precision_plan(config))
    print(perf_plan(config, data_parallel_size(config, world_size)))
    # The dry run often runs where the job will not (a login node): say what this machine lacks, go on.
    problems = fp8_platform_problems(config) + fusion_platform_problems(config)
    if problems:
        print("on this machine: " + "; ".join(problems))


def describe_stage(config) -> str:
    """One line from the config alone: the stage, what trains (with multipliers), the loss, the optimizer."""
    from megavl.models.parts import trained_parts

    t = config.train
    parts = {name: v for name, v in trained_parts(config).items() if isinstance(v, dict)}
    trains = [name + (f" (lr x{v['lr_mult']:g})" if v["lr_mult"] != 1 else "")
              for name, v in parts.items() if v["train"]]
    if t.parts.vision_last_layers is not None and parts["vision"]["train"]:
        trains[trains.index("vision")] = f"vision (last {t.parts.vision_last_layers} layers)"
    frozen = [name for name, v in parts.items() if not v["train"]]
    rows = f"; embedding rows >= {t.embedding_rows_from} only" if t.embedding_rows_from is not None else ""
    optimizer = "Muon + AdamW" if t.optimizer == "muon" else "AdamW"
    return (f"stage {t.stage or '(none)'}: trains {', '.join(trains)}; frozen: {', '.join(frozen) or 'nothing'}"
            f"{rows}; loss on {t.loss_scope}; optimizer {optimizer}")


def train(config) -> None:
    from megavl.data.tokenizer import check_tokenizer_matches_model, load_tokenizer
    from megavl.models.build import build_model, parameters_gathered, wrap_for_training
    from megavl.models.parts import describe as describe_parts
    from megavl.models.parts import part_counts
    from megavl.models.precision import check_fp8_platform, precision_plan
    from megavl.platform.perf import check_perf_platform, perf_plan
    from megavl.platform.distributed import init_distributed, set_seed, shutdown
    from megavl.platform.features import detect, layer_backend_for
    from megavl.training.checkpointer import Checkpointer, with_resume_resolved
    from megavl.training.metrics import MetricsWriter, step_metrics, step_totals
    from megavl.training.moe_metrics import expert_load_image, router_statistics
    from megavl.training.nonfinite import NonFiniteGuard
    from megavl.training.optimizer import build_optimizer, build_scheduler
    from megavl.training.preemption import EXIT_PREEMPTED, StopRequests, write_exit_status
    from megavl.training.step import evaluate, num_microbatches, train_step

    # 1. Processes, parallel groups and seeds (validates the config first); values
    #    left to the run (resuming, the image back end) are resolved once, into a new config.
    #    From here on SIGTERM / SIGUSR1 stop the run after the current step, with a checkpoint.
    layout = init_distributed(config)
    stop = StopRequests(config.train.max_wall_time, detect().device)
    set_seed(config.train.seed)
    is_logger = layout.rank == 0
    logging.basicConfig(level=logging.INFO if is_logger else logging.WARNING,
                        format=f"[rank{layout.rank}] %(levelname)s %(name)s: %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    metrics = MetricsWriter(config.logging.dir, config.train.steps, enabled=is_logger)
    metrics.message(detect().describe())
    metrics.message("layers: %s (%s)" % layer_backend_for(config))
    metrics.message(precision_plan(config))
    check_fp8_platform(config)  # train.fp8 on a machine without TE or an FP8-capable GPU stops here
    metrics.message(layout.describe())
    metrics.message(perf_plan(config, layout.data))
    check_perf_platform(config)  # a fused kernel asked for that this machine cannot run stops here
    config = with_resume_resolved(config, metrics)
    config = _with_image_backend_chosen(config, metrics)
    config = _with_decode_place_chosen(config, metrics)

    # 2. Model, optimizer and schedule.
    model = build_model(config)
    chunks = wrap_for_training(config, model)
    metrics.message(describe_stage(config))
    metrics.message(describe_parts(part_counts(model)))
    optimizer = build_optimizer(config, chunks)
    if config.train.optimizer == "muon":
        from megavl.training.muon import describe_split

        metrics.message(describe_split(chunks))
    scheduler = build_scheduler(config, optimizer)

    # 3. Data: every TP/PP rank of one data-parallel rank reads the same stream.
    tokenizer = load_tokenizer(config.data.tokenizer)
    check_tokenizer_matches_model(tokenizer, config)
    microbatches = num_microbatches(config, layout.data)
    pixel_cap = _max_pixel_cap(config)
    train_data = _step_batches(config, tokenizer, layout, microbatches, max_pixels=pixel_cap(0))
    task_items = _task_eval_items(config, metrics)

    # 4. Resume, or start from pretrained weights.
    checkpointer = Checkpointer(config, model, optimizer, scheduler, train_data, metrics, chunks)
    state = checkpointer.restore()
    guard = NonFiniteGuard(config.train.max_nonfinite_steps, state.extra.get("skipped_steps", 0))

    # 5. Train, until the last step or a stop request all ranks agree on.
    stopped = None
    peak, peak_source = _peak_flops(config, detect())
    metrics.message(peak_source)
    while state.step < config.train.steps and not stopped:
        started = time.monotonic()
        # A new stage of the max-pixel schedule rebuilds the loader at the same position.
        max_pixels = pixel_cap(state.step)
        train_data.set_max_pixels(max_pixels)
        batches = train_data.next_step()
        logs = _logs_step(config, state.step + 1)
        with router_statistics(config, microbatches, collect=logs) as router:
            result = train_step(config, chunks, optimizer, scheduler, iter(batches), microbatches)
        totals = step_totals(batches, config, group=_data_parallel_group())
        skipped = guard.record(state.step + 1, result)  # raises after too many in a row, on every rank
        if skipped:
            metrics.message(skipped)
        state.extra["skipped_steps"] = guard.skipped_steps
        state.step += 1
        state.consumed_microbatches += microbatches
        step_time = time.monotonic() - started

        if logs:
            metrics.log_step(state.step, step_metrics(result, totals.tokens, step_time, train_data.stats,
                                                      train_data.last_balance, max_pixels, router.scalars(),
                                                      guard.skipped_steps, totals.model_flops,
                                                      layout.world_size, peak))
            if router.stats:
                metrics.log_record(state.step, {"moe": router.stats})
                metrics.log_image("moe/expert_load", expert_load_image(router.stats), state.step)
            _check_data_failures(config, train_data.stats)
        if config.data.val_path and state.step % config.train.eval_interval == 0:
            val_data = _step_batches(config, tokenizer, layout, microbatches, split="val")
            with parameters_gathered(chunks):
                metrics.log_eval(state.step, {"loss": evaluate(config, chunks, val_data, microbatches)})
        if task_items and _task_eval_due(config, state.step):
            with parameters_gathered(chunks):
                metrics.log_tasks(state.step, _evaluate_tasks(config, model, chunks, tokenizer, task_items, layout))
        checkpointer.poll()
        checkpointer.save(state)
        if state.step < config.train.steps:  # the same condition on every rank: all or none join
            stopped = stop.agreed()

    # 6. The final checkpoint (unless the interval just wrote it) and where everything is.
    checkpointer.save(state, last=True)
    if stopped:
        metrics.message(f"stopped at step {state.step} of {config.train.steps}: {stopped}; "
                        + (f"exit status {EXIT_PREEMPTED}, the same command resumes"
                           if config.checkpoint.dir else "nothing saved (checkpoint.dir is not set)"))
    if is_logger:
        _plot(config, metrics)
    log_dir = os.path.abspath(config.logging.dir)
    metrics.message(f"logs: {log_dir} (metrics.jsonl, metrics.png, tensorboard/); "
                    f"browse them with: tensorboard --logdir {os.path.join(log_dir, 'tensorboard')}")
    train_data.close()
    metrics.close()
    shutdown()
    stop.close()
    status = EXIT_PREEMPTED if stopped else 0
    if is_logger:
        write_exit_status(status)
    sys.exit(status)


def _logs_step(config, step: int) -> bool:
    """Whether step (counted from 1) writes its metrics: every logging.interval steps and the last."""
    return step % config.logging.interval == 0 or step == config.train.steps


def _step_batches(config, tokenizer, layout, microbatches: int, split: str = "train", max_pixels=None):
    """The training stream (balanced across DP ranks when configured), or a fresh validation stream."""
    from megavl.data.distribute import StepBatches
    from megavl.data.energon_stream import EnergonDataStream
    from megavl.platform.features import detect

    training = split == "train"
    path = config.data.train_path if training else config.data.val_path
    return StepBatches(
        lambda rank, world: EnergonDataStream(path, tokenizer, config, rank, world, config.train.seed,
                                              split=split, max_pixels=max_pixels),
        microbatches, layout.data_rank, layout.data, config.data.layout_invariant,
        balance=training and config.data.balance_vision_tokens, group=_data_parallel_group() if training else None,
        device=detect().device,
    )


def _plot(config, metrics) -> None:
    """metrics.png beside metrics.jsonl; a run whose checkpoint is saved does not fail over a plot."""
    from megavl.training.metrics_plot import plot_metrics

    try:
        metrics.message(f"plot of loss and task accuracy: {plot_metrics(config.logging.dir)}")
    except Exception as e:  # noqa: BLE001 - matplotlib and the file system raise many kinds
        logging.getLogger(__name__).warning("metrics.png not written: %s: %s", type(e).__name__, e)


def _task_eval_items(config, metrics):
    """The validation items task evaluation answers (train.task_eval), read once; None when off."""
    from megavl.eval.items import load_items

    e = config.train.task_eval
    if e.interval is None:
        return None
    items = load_items(config.data.val_path, e.samples)
    metrics.message(f"task evaluation: {len(items)} answers of the first {e.samples} validation records, "
                    f"every {e.interval} steps" + (" and after the last" if e.at_end else ""))
    return items


def _task_eval_due(config, step: int) -> bool:
    e = config.train.task_eval
    return step % e.interval == 0 or (e.at_end and step == config.train.steps)


def _evaluate_tasks(config, model, chunks, tokenizer, items, layout):
    """Generates on every data-parallel rank's share of the items; the reduced table."""
    from megavl.eval.generation import GenerationSettings
    from megavl.eval.task_eval import evaluate_tasks
    from megavl.platform.features import detect

    e = config.train.task_eval
    try:
        return evaluate_tasks(model, config, detect(), tokenizer, items, GenerationSettings(e.max_new_tokens),
                              e.batch_size, layout.data_rank, layout.data, _data_parallel_group())
    finally:
        for chunk in chunks:
            chunk.train()


def _with_image_backend_chosen(config, metrics):
    """Resolves data.image_backend = auto once per run, on rank 0, for every process and
    worker: a per-process timing could pick differently and give ranks different pixels.
    A resumed run keeps the choice its checkpoint records, so it continues bit for bit."""
    from megavl.config import replace_field
    from megavl.data.image_backends import resolve_image_backend
    from megavl.training.checkpoint import stored_config

    if config.data.image_backend != "auto":
        return config
    choice = [None]
    if dist.get_rank() == 0:
        resumed = stored_config(config.checkpoint.load) if config.checkpoint.load else None
        previous = resumed["data"]["image_backend"] if resumed else None
        choice = [resolve_image_backend("auto", previous)]
    dist.broadcast_object_list(choice, src=0)
    metrics.message(f"image back end: {choice[0]} (data.image_backend = auto)")
    return replace_field(config, "data.image_backend", choice[0])


def _with_decode_place_chosen(config, metrics):
    """Resolves data.decode_images_in = auto for this run's device (the same on every rank)."""
    from megavl.config import replace_field
    from megavl.data.trainer_decode import decode_place
    from megavl.platform.features import detect

    device = detect().device
    place = decode_place(config, device)
    where = (f"in the training process on {device}, after the loader" if place == "trainer"
             else "in the data loader, on the CPU")
    metrics.message(f"images decoded {where} (data.decode_images_in = {config.data.decode_images_in}, "
                    f"back end {config.data.image_backend})")
    return replace_field(config, "data.decode_images_in", place)


def _max_pixel_cap(config):
    """step -> the native-resolution max-pixel cap for that step (None: no schedule)."""
    from megavl.data.resolution import MaxPixelSchedule

    d, v = config.data, config.model.vision
    if not d.max_pixels_schedule.start_max_pixels:
        return lambda step: None
    schedule = MaxPixelSchedule(d.max_pixels_schedule, d.resolution.max_pixels, config.train.steps,
                                v.patch_size * v.spatial_merge_size)
    return lambda step: schedule.max_pixels(max(step, 0))


def _check_data_failures(config, stats) -> None:
    """Stops every rank together when a dataset fails too often (counts summed over DP ranks)."""
    from megavl.data.energon_stream import DataStats, check_failure_rates

    if config.data.layout_invariant:
        total = stats  # every rank read the same records
    else:
        gathered = [None] * dist.get_world_size(_data_parallel_group())
        dist.all_gather_object(gathered, (stats.read, stats.failed), group=_data_parallel_group())
        total = DataStats()
        for read, failed in gathered:
            total.add_counts(read, failed)
    check_failure_rates(total.read, total.failed, config)


def _peak_flops(config, platform):
    """The per-GPU peak FLOP/s the logged MFU divides by (None: no MFU), and a line saying whose."""
    from megavl.planning.hardware import gpu_by_device_name, peak_flops

    override = config.logging.peak_tflops  # validate() has checked it is positive
    if override is not None:
        return override * 1e12, f"MFU against logging.peak_tflops = {override:g} TFLOP/s per GPU"
    name = torch.cuda.get_device_name() if platform.cuda else None
    peak = peak_flops(name, config.train.dtype)
    if peak is None:
        return None, (f"no MFU: no known {config.train.dtype} peak for {name or 'the CPU'} "
                      "(logging.peak_tflops sets one); TFLOP/s per GPU is logged")
    return peak, (f"MFU against {peak / 1e12:g} TFLOP/s per GPU, the dense bf16 peak of the "
                  f"{gpu_by_device_name(name).part}")


def _data_parallel_group():
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_group()


def main() -> None:
    from megavl.config import ConfigError, config_from_args
    from megavl.platform.distributed import world_size_from_env

    args = parse_args()
    try:
        config = config_from_args(args)
        if args.dry_run:
            dry_run(config, args.world_size or world_size_from_env())
            return
    except ConfigError as e:
        # Every problem is in the message, each naming its field; a traceback would only bury it.
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_INVALID_CONFIG)
    from megavl.platform.perf import cuda_connection_setting

    # Read when CUDA starts, so set before anything touches the GPU.
    connections = cuda_connection_setting(config, os.environ)
    if connections is not None:
        os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] = connections
    train(config)

if __name__ == "__main__":
    main()
