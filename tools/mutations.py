"""The curated mutations `make mutants` (tools/mutants.py) runs: realistic bugs and the tests that catch them.

Each entry replaces one exact snippet of one file (``old`` must occur exactly
once there, or the check fails, so an entry cannot go stale unnoticed) and
names the fastest tests that fail with the bug in place: pytest node ids or
files, run with -x. ``bug`` is the one line a reader of the report needs.

Adding one: reproduce the bug with the smallest edit that a person could
plausibly make, run ``python tools/mutants.py --only NAME`` and keep the
quickest tests that kill it (in-process tests before torchrun ones).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    bug: str


_RANDOMNESS_RESUME = ("tests/test_preemption.py::"
                      "test_wall_time_stop_with_randomness_in_play_exits_75_and_the_same_command_resumes_exactly")

_GRADIENT_CONTRACT = ("tests/test_model_contract.py::"
                      "test_every_trained_parameter_gets_a_gradient_read_in_its_own_modules_forward")

MUTATIONS = [
    # -- attention mask ---------------------------------------------------------------
    Mutation(
        name="mask-images-cross-documents",
        file="megavl/attention/mask.py",
        old="            order_ok = order_ok | both_vision\n",
        new="            order_ok = order_ok | both_vision\n"
            "            same_document = same_document | both_vision\n",
        tests=("tests/test_attention_mask.py::test_documents_never_see_each_other",),
        bug="bidirectional image attention also bypasses the same-document rule: images see other packed documents",
    ),
    Mutation(
        name="mask-later-turns-see-earlier-turns",
        file="megavl/attention/mask.py",
        old="turn_visible = (turn_k == SHARED_TURN_ID) | (turn_k == turn_q)",
        new="turn_visible = turn_k <= turn_q",
        tests=("tests/test_attention_mask.py::test_conversation_masking_hides_other_turns_but_not_shared_context",),
        bug="conversation masking lets a QA turn see the earlier turns, not only the shared context",
    ),
    Mutation(
        name="document-ids-collapsed",
        file="megavl/models/inputs.py",
        old='vlm_mask_mod(batch["document_ids"], batch["image_ids"]',
        new='vlm_mask_mod(batch["document_ids"].clamp(max=0), batch["image_ids"]',
        tests=("tests/test_vlm_model.py::test_a_documents_loss_ignores_its_pack_neighbours_and_padding",),
        bug="the microbatch's document ids are collapsed to one document before the mask is built",
    ),
    # -- loss -------------------------------------------------------------------------
    Mutation(
        name="loss-per-microbatch",
        file="megavl/training/step.py",
        old='    return loss_sum, num_tokens, {"lm loss": report}',
        new='    return loss_sum / num_tokens, torch.ones_like(num_tokens), {"lm loss": report}',
        tests=("tests/test_model_contract.py::test_the_step_gradient_is_the_mean_over_all_answer_tokens_of_the_step",),
        bug="the loss is normalised per microbatch (a mean of microbatch means), not over the step's answer tokens",
    ),
    # -- vision LoRA ------------------------------------------------------------------
    Mutation(
        name="lora-column-ignores-row-mask",
        file="megavl/models/vision_lora.py",
        old="hidden = torch.nn.functional.linear(x * mask, self.lora_a)",
        new="hidden = torch.nn.functional.linear(x, self.lora_a)",
        tests=("tests/test_vision_lora.py::test_an_adapter_changes_only_vision_positions",),
        bug="a column-parallel vision adapter (QKV, fc1) is applied to text rows too",
    ),
    Mutation(
        name="lora-row-ignores-row-mask",
        file="megavl/models/vision_lora.py",
        old="hidden = torch.nn.functional.linear(input_ * mask, self.lora_a)",
        new="hidden = torch.nn.functional.linear(input_, self.lora_a)",
        tests=("tests/test_vision_lora.py::test_gradients_reach_adapters_only_from_vision_tokens",),
        bug="a row-parallel vision adapter (attention output, fc2) is applied to text rows too",
    ),
    Mutation(
        name="lora-b-checkpointed-unsharded",
        file="megavl/models/vision_lora.py",
        old='{"weight": 0, "bias": 0, "lora_b": 0}',
        new='{"weight": 0, "bias": 0}',
        tests=("tests/test_checkpoint_reshard.py::test_tp2_checkpoint_reloads_at_tp1",),
        bug="a column-parallel adapter's B is checkpointed as if replicated over TP, not split on its output dim",
    ),
    # -- data -------------------------------------------------------------------------
    Mutation(
        name="pack-drops-its-last-sample",
        file="megavl/data/packing.py",
        old="        return pack.samples\n",
        new="        return pack.samples[:-1]\n",
        tests=("tests/test_packing.py::test_packing_loses_no_token_and_respects_budgets",),
        bug="an emitted pack loses its last sample",
    ),
    Mutation(
        name="restored-pack-drops-its-last-sample",
        file="megavl/data/packing.py",
        old="            for sample in samples:\n",
        new="            for sample in samples[:-1]:\n",
        tests=("tests/test_packing.py::test_packing_is_deterministic_and_pending_round_trips",),
        bug="an open pack restored from the loader state loses its last sample",
    ),
    Mutation(
        name="balance-plan-not-carried-out",
        file="megavl/data/balance.py",
        old="    return packs, BalanceStats.of(counts, assignment)",
        new="    return list(local_packs), BalanceStats.of(counts, assignment)",
        tests=("tests/test_balance.py::test_balance_step_moves_packs_intact_between_two_gloo_ranks",),
        bug="balance_step computes and exchanges the plan but keeps training on the packs it drew",
    ),
    Mutation(
        name="mrope-text-after-image-counts-tokens",
        file="megavl/data/batch.py",
        old="        next_pos = int(span.max()) + 1\n",
        new="        next_pos += span.shape[1]\n",
        tests=("tests/test_vlm_model.py::test_mrope_positions_follow_the_image_grid",),
        bug="text after an image continues its positions by the image's token count (1D habit), not max + 1",
    ),
    Mutation(
        name="sixteen-bit-greyscale-clipped",
        file="megavl/data/images.py",
        old='    if image.mode.startswith("I"):\n'
            "        # 16-bit greyscale (PNG opens as I;16, or I): Pillow's convert(\"RGB\") clips\n"
            "        # every value above 255 instead of scaling, which turns the image white.\n"
            "        grey = np.asarray(image, dtype=np.float64)\n"
            "        grey = np.rint(np.clip(grey, 0, 65535) / 257.0).astype(np.uint8)\n"
            '        return Image.fromarray(grey).convert("RGB")\n',
        new="",
        tests=("tests/test_images.py::test_sixteen_bit_greyscale_is_scaled_to_eight_bits_not_clipped",),
        bug="16-bit greyscale PNGs go through Pillow's convert, which clips them to white instead of scaling",
    ),
    Mutation(
        name="loader-first-batch-not-forked-rng",
        file="megavl/data/energon_stream.py",
        old="            with torch.random.fork_rng(devices=[]):\n",
        new="            if True:\n",
        tests=(_RANDOMNESS_RESUME,),
        bug="starting the loader draws from the global generator unforked, so a resumed run's dropout drifts",
    ),
    # -- checkpoints ------------------------------------------------------------------
    Mutation(
        name="rng-state-not-restored",
        file="megavl/training/checkpoint.py",
        old='        _set_rng_state(state["rng_state"])\n',
        new="",
        tests=("tests/test_checkpointing.py::test_resume_restores_the_random_generators_and_the_loader_position",),
        bug="a resumed run does not restore the RNG states it saved",
    ),
    Mutation(
        name="loader-state-not-restored",
        file="megavl/training/checkpoint.py",
        old='        if data_stream is not None and state["data_state"] is not None:\n'
            '            data_stream.load_state_dict(state["data_state"])\n',
        new="",
        tests=("tests/test_checkpointing.py::test_resume_restores_the_random_generators_and_the_loader_position",),
        bug="a resumed run does not restore the loader's position: it sees the first batches again",
    ),
    Mutation(
        name="checkpoint-exception-not-a-failed-save",
        file="megavl/training/checkpoint.py",
        old="_SAVE_FAILURES = (Exception, CheckpointException)",
        new="_SAVE_FAILURES = (Exception,)",
        tests=("tests/test_checkpointing.py::test_failed_tensor_write_is_reported_and_keeps_the_previous_checkpoint",),
        bug="a writer's CheckpointException (a BaseException) escapes instead of being reported as a failed save",
    ),
    Mutation(
        name="latest-names-save-before-it-is-in-place",
        file="megavl/training/checkpoint_files.py",
        old="    os.replace(partial, saved)\n"
            "    fsync_dir(root)\n"
            "    write_latest(root, os.path.basename(saved))\n",
        new="    write_latest(root, os.path.basename(saved))\n"
            "    os.replace(partial, saved)\n"
            "    fsync_dir(root)\n",
        tests=("tests/test_checkpointing.py::"
               "test_failed_save_names_folder_and_reason_and_keeps_the_previous_checkpoint[publishing-disk-full]",),
        bug="publish points latest at the .saved folder before the finished save has been moved there",
    ),
    Mutation(
        name="background-save-published-at-submit",
        file="megavl/training/checkpoint.py",
        old="        request.add_finalize_fn(put_in_place)\n",
        new="        put_in_place()\n",
        tests=("tests/test_checkpointing.py::"
               "test_background_save_writes_the_weights_of_its_step_and_moves_latest_only_when_done",),
        bug="an asynchronous save is published when it is submitted, before its writers have finished",
    ),
    # -- conversion -------------------------------------------------------------------
    Mutation(
        name="qkv-table-swaps-k-and-v",
        file="megavl/convert/qwen_lm.py",
        old='_ATTN + "k_proj.weight", _ATTN + "v_proj.weight", heads, groups),',
        new='_ATTN + "v_proj.weight", _ATTN + "k_proj.weight", heads, groups),',
        tests=("tests/test_convert_qwen2_5_vl.py::test_import_reproduces_hf_logits_and_positions",),
        bug="the LM's mapping table pairs k_proj with the value rows and v_proj with the key rows (both directions)",
    ),
    Mutation(
        name="qkv-interleave-swaps-k-and-v",
        file="megavl/convert/mapping.py",
        old="return torch.cat([q, k, v], dim=1).reshape(-1, *rest)",
        new="return torch.cat([q, v, k], dim=1).reshape(-1, *rest)",
        tests=("tests/test_convert_mapping.py::test_qkv_interleaves_query_groups_like_megatron",),
        bug="the import's per-group interleave puts each group's value head before its key head",
    ),
    # -- balancing ties, freezing, learning rates, non-finite steps --------------------
    Mutation(
        name="balance-tie-overfills-a-group",
        file="megavl/data/balance.py",
        old="        if loads[src] == least and len(groups[src]) < m:\n",
        new="        if loads[src] == least and len(groups[src]) <= m:\n",
        tests=("tests/test_balance.py::test_ties_between_loads_still_give_every_rank_m_packs",),
        bug="on a tie the pack's own rank takes it even when its group already holds m packs",
    ),
    Mutation(
        name="balance-moves-packs-for-no-gain",
        file="megavl/data/balance.py",
        old="    if limit >= max(_loads(identity, weight)):\n",
        new="    if limit > max(_loads(identity, weight)):\n",
        tests=("tests/test_balance.py::test_packs_stay_home_unless_moving_them_lowers_the_maximum",),
        bug="packs are exchanged between ranks when balancing reaches only the same maximum",
    ),
    Mutation(
        name="frozen-parts-still-train",
        file="megavl/models/parts.py",
        old="        param.requires_grad_(trains(config, name, param))\n",
        new="        param.requires_grad_(param.requires_grad)\n",
        tests=("tests/test_parts.py::test_frozen_parts_stay_identical_and_hold_no_gradient_buffer_or_optimizer_state",),
        bug="train.parts is read but nothing is frozen before DDP wraps the model",
    ),
    Mutation(
        name="part-lr-mult-ignored",
        file="megavl/models/parts.py",
        old="ParamGroupOverride(max_lr=t.lr * settings.lr_mult, min_lr=t.min_lr * settings.lr_mult)",
        new="ParamGroupOverride(max_lr=t.lr, min_lr=t.min_lr)",
        tests=("tests/test_parts.py::test_a_learning_rate_multiplier_scales_exactly_its_parts_update",),
        bug="a part's lr_mult makes its own param group but the group keeps the base learning rate",
    ),
    Mutation(
        name="non-finite-step-applied",
        file="megavl/training/step.py",
        old="    if finite:\n        updated, grad_norm, _ = optimizer.step()\n",
        new="    if True:\n        updated, grad_norm, _ = optimizer.step()\n",
        tests=("tests/test_nonfinite.py::test_a_non_finite_step_changes_nothing_and_training_continues_as_if_it_never_came",),
        bug="a step with a NaN loss is applied: the weights and Adam's moments turn NaN",
    ),
    Mutation(
        name="embedding-row-mask-not-applied",
        file="megavl/training/step.py",
        old="    zero_frozen_row_grads(config, model_chunks)\n",
        new="",
        tests=("tests/test_embedding_expansion.py::"
               "test_training_the_expand_embeddings_stage_moves_only_the_rows_from_embedding_rows_from[untied]",),
        bug="train.embedding_rows_from is validated but the old tokens' gradient rows are never zeroed",
    ),
    # -- Muon -------------------------------------------------------------------------
    Mutation(
        name="muon-scales-by-the-shard",
        file="megavl/training/muon.py",
        old="                if partition_dim == 0:\n                    rows *= group.size()\n                else:\n                    cols *= group.size()\n",
        new="",
        tests=("tests/test_muon.py::test_muon_layout_matches_one_process[TP2]",),
        bug="a TP-sharded matrix's Muon update is scaled by its shard's shape, not the whole matrix's",
    ),
    Mutation(
        name="muon-layer-wise-weights-not-gathered",
        file="megavl/training/muon.py",
        old="                param.data.copy_(value)\n",
        new="                pass\n",
        tests=("tests/test_muon.py::test_muon_layout_matches_one_process[DP2-layer-wise]",),
        bug="with the layer-wise distributed Muon, a rank never receives the weights other ranks updated",
    ),
    # -- generation and task scoring ---------------------------------------------------
    Mutation(
        name="generation-prefill-causal-images",
        file="megavl/eval/generation.py",
        old='        bidirectional = self.config.model.lm.image_attention == "bidirectional"\n',
        new="        bidirectional = False\n",
        tests=("tests/test_generation.py::test_cached_decoding_equals_recomputing_the_whole_sequence",),
        bug="generation's prompt pass makes image attention causal although the model was trained bidirectional",
    ),
    Mutation(
        name="generation-positions-restart-after-the-prompt",
        file="megavl/eval/generation.py",
        old="following = int(positions.max()) + 1 + torch.arange(total - longest)",
        new="following = len(prompt) + torch.arange(total - longest)",
        tests=("tests/test_generation.py::test_cached_decoding_equals_recomputing_the_whole_sequence",),
        bug="generated tokens continue the prompt's length, not its largest multimodal RoPE position",
    ),
    Mutation(
        name="point-hit-ignores-the-object",
        file="megavl/eval/answers.py",
        old="            hit = x0 <= predicted[1] <= x1 and y0 <= predicted[2] <= y1",
        new="            hit = distance <= 50",
        tests=("tests/test_eval_answers.py",),
        bug="a pointing answer counts as a hit by its distance to the centre, not by falling inside the object",
    ),
    Mutation(
        name="task-scores-not-reduced",
        file="megavl/eval/task_eval.py",
        old="    if data_world > 1:\n        scores, skipped = _reduced(scores, skipped, group)",
        new="    if data_world > 2:\n        scores, skipped = _reduced(scores, skipped, group)",
        tests=("tests/test_trainer.py::test_moe_with_expert_parallelism_learns_and_reports_router_metrics",),
        bug="task accuracy during training reports rank 0's share only, not every data-parallel rank's",
    ),
    # -- performance switches (perf) ----------------------------------------------------
    Mutation(
        name="text-only-microbatch-skips-the-tower",
        file="megavl/models/vlm.py",
        old="        elif self._tower_trains():\n            hidden = hidden + self._blank_image_term(hidden)\n",
        new="",
        tests=(_GRADIENT_CONTRACT,),
        bug="a microbatch without images leaves the tower out, so an overlapped reduce waits forever for its buckets",
    ),
    Mutation(
        name="patch-weight-read-outside-its-module",
        file="megavl/models/vision.py",
        old="        return self.proj(pixel_values)\n",
        new="        weight = self.proj.weight\n"
            "        return F.linear(pixel_values.to(weight.dtype), weight.reshape(weight.shape[0], -1), self.proj.bias)\n",
        tests=(_GRADIENT_CONTRACT,),
        bug="the patch embedding's weight is read outside its module's forward: the parameter gather leaves it stale",
    ),
    Mutation(
        name="step-loss-read-per-microbatch",
        file="megavl/training/step.py",
        old='        total += item["lm loss"].to(device, torch.float64)\n',
        new='        total += item["lm loss"].to(torch.float64).cpu().to(device)\n',
        tests=("tests/test_host_syncs.py",),
        bug="the step's loss is copied to the host once per microbatch, a device sync each",
    ),
    Mutation(
        name="recompute-records-router-statistics-twice",
        file="megavl/models/recompute.py",
        old="                with _side_effects_recorded_once():\n",
        new="                with contextlib.nullcontext():\n",
        tests=("tests/test_recompute.py",),
        bug="a recomputed layer records its router statistics and aux losses again in the backward",
    ),
]
