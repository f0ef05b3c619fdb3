"""
The mutation check: do the tests fail when the code is wrong?

    python -m tests.mutate               # every mutation, two at a time (~4 min on 2 cores); exit 1 if any is missed
    python -m tests.mutate --only k3     # the mutations whose name contains "k3"
    python -m tests.mutate --list        # the list, with the tests meant to catch each

Each mutation is a one-line bug (a flipped sign, a swapped index, a dropped weight or mask, an off-by-one, state
forgotten on resume) put into a fresh copy of the project (the files git tracks or would track, with ../shared
beside it); the tests named with it then run on that copy. A mutation is *caught* when they fail, *missed* when
they pass. Before any mutation, the same tests run on an unmutated copy and must pass, so a caught mutation means
the bug was caught, not that the tests were broken already. Every mutation's text must occur exactly once in its
file (tests/test_mutate.py checks this in the fast suite), so the list cannot silently go stale as the code moves.

Run it before calling a change to the core (riel, losses, buffer, mef, mel, eval, rollout, verify, train, premise,
the synthetic testbeds, the fair ablation's choices) done;
a new rule in the core wants a mutation here and a test that catches it.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]


class Mutation(NamedTuple):
    name: str
    file: str
    old: str  # occurs exactly once in file
    new: str
    tests: tuple  # pytest node ids (file or file::test) that must fail


T = "tests/"
RIEL, REF, LOSSES = T + "test_riel.py::", T + "test_riel_reference.py::", T + "test_losses.py::"
MEF, MEL, EVAL, ROLL = T + "test_mef.py::", T + "test_mel.py::", T + "test_eval.py::", T + "test_rollout.py::"
TRAIN, VERIFY = T + "test_train.py::", T + "test_verify.py::"
HAND_STEP = RIEL + "test_policy_update_equals_hand_computed_gradient"
BUFFER_STEP = REF + "test_buffer_step_equals_lambda2_times_the_naive_nll_of_each_experts_prompt_and_full_target"
K3 = REF + "test_k3_to_a_perturbed_reference_moves_the_weights_and_the_log_as_computed_by_hand"
SCORED = REF + "test_every_row_is_scored_against_its_own_record"
EVAL_SCRIPT = EVAL + "test_evaluate_aggregates_a_scripted_completer_as_computed_by_hand"
MID_RIEL = TRAIN + "test_killed_mid_riel_with_a_non_empty_buffer_and_a_reference_resumes_bit_exact"
SCHEDULE = TRAIN + "test_lr_schedule_warms_up_peaks_and_decays_to_its_floor"
PREMISE = T + "test_premise.py::"
LORA = T + "test_lora.py::"
WRITE_ONCE = T + "test_dist.py::test_a_rank_that_arrives_after_rank_0_wrote_still_joins_every_collective"
STEP_SCALE = PREMISE + "test_step_scale_divides_the_transfer_and_sft_sums_by_the_steps_sampled_tokens"
DISJOINT = T + "test_disjoint.py::"
FAULTS = T + "test_faults.py::"
REPLAY = DISJOINT + "test_sft_replay_trains_on_exactly_the_entries_the_buffer_flushed_in_order"
AUTOCAST_ORDER = T + "test_autocast_grads.py::test_the_cache_is_cleared_between_no_grad_and_grad_enabled_forwards"

MUTATIONS = [
    # ---- riel.py: who teaches whom, which rows, which record, which terms
    Mutation("transfer E+ and E- swapped", "transfer.py", "return plus, minus", "return minus, plus",
             (RIEL + "test_choose_transfer_picks_best_and_worst_with_lowest_index_on_ties",)),
    Mutation("E+ ties go to the highest index", "transfer.py", "key=lambda i: (-means[i], i))",
             "key=lambda i: (-means[i], -i))", (RIEL + "test_choose_transfer_picks_best_and_worst_with_lowest_index_on_ties",)),
    Mutation("transfer between experts of equal means", "transfer.py", "if means[plus] == means[minus] or not bool(",
             "if not bool(", (RIEL + "test_choose_transfer_skips_ties_and_teachers_without_a_correct_answer",)),
    Mutation("every row scored against the first record", "riel.py", "records[row // per_question]", "records[0]",
             (SCORED,)),
    Mutation("training log-probs at T = 1", "riel.py", "token_logprobs(model, p, c, temperature=cfg.temperature)",
             "token_logprobs(model, p, c)", (REF + "test_training_log_probs_are_taken_at_the_sampling_temperature",)),
    Mutation("k3 reference log-probs from the policy", "riel.py", "ref, _ = token_logprobs(ref_model, p, c",
             "ref, _ = token_logprobs(model, p, c", (K3,)),
    Mutation("k3 term without beta", "riel.py", "per_token + cfg.kl_beta * kl", "per_token + kl", (K3,)),
    Mutation("zero-advantage rows trained", "riel.py", "if counted[r] > 0 and signal[r]]", "if counted[r] > 0]",
             (HAND_STEP,)),
    Mutation("token count of trained rows only", "riel.py", '"n_tokens": max(1, sum(counted))',
             '"n_tokens": max(1, sum(counted[r] for r in range(len(counted)) if adv[r] != 0))', (HAND_STEP,)),
    Mutation("Dr.GRPO normaliser from the longest row", "riel.py", '"max_len": cfg.max_new_tokens}',
             '"max_len": max(lengths)}', (HAND_STEP,)),
    Mutation("transfer term without lambda1", "riel.py", "\n        micro_backward(cfg.lambda1 * loss)",
             "\n        micro_backward(loss)", (RIEL + "test_transfer_term_value_and_gradient_flow_only_through_the_weak_expert",)),
    Mutation("O+ drawn from E-'s answers", "transfer.py", "completions[(q * N + plus) * G + g]",
             "completions[(q * N + minus) * G + g]",
             (RIEL + "test_transfer_pairs_teach_the_weak_expert_a_correct_answer_of_the_strong_one",)),
    Mutation("transfer prompts swapped", "transfer.py", "pairs.append((prompts[q * N + plus], prompts[q * N + minus],",
             "pairs.append((prompts[q * N + minus], prompts[q * N + plus],",
             (RIEL + "test_transfer_pairs_teach_the_weak_expert_a_correct_answer_of_the_strong_one",)),
    Mutation("buffer SFT without lambda2", "riel.py", "cfg.lambda2 * sft_scale) if flushed else 0.0",
             "sft_scale) if flushed else 0.0", (BUFFER_STEP,)),
    Mutation("MEL term without its weight", "riel.py", "cfg.micro_batch_size, mel_weight) if mel_examples",
             "cfg.micro_batch_size, 1.0) if mel_examples", (MEL + "test_mel_adds_weight_times_the_nll_gradient_to_the_rl_update",)),
    Mutation("E+ counted from E-", "premise.py", 'm[f"e_plus/{ex.name}"] = sum(p == i for p, _ in chosen)',
             'm[f"e_plus/{ex.name}"] = sum(n == i for _, n in chosen)',
             (RIEL + "test_metrics_report_rewards_spread_transfers_and_timing",)),
    Mutation("term_scale step leaves the transfer on its own count", "riel.py",
             'n_kl = counts["n_tokens"] if cfg.term_scale == "step" else n_o', "n_kl = n_o", (STEP_SCALE,)),
    Mutation("term_scale step leaves the SFT term on its own count", "riel.py",
             'sft_scale = n_sft / counts["n_tokens"] if cfg.term_scale == "step" else 1.0', "sft_scale = 1.0",
             (STEP_SCALE,)),
    Mutation("truncated rows trained though masked", "riel.py",
             'counted = [0 if cfg.mask_truncated and f == "length" else n for', "counted = [n for",
             (PREMISE + "test_masked_truncated_rows_get_no_loss_and_leave_the_token_count",)),
    Mutation("random tie-break draws E- among the best", "transfer.py",
             "minus = pick([i for i, m in enumerate(means) if m == means[minus]], generator)",
             "minus = pick([i for i, m in enumerate(means) if m == means[plus]], generator)",
             (PREMISE + "test_random_ties_pick_each_tied_expert_equally_often",)),
    Mutation("a term's gradient norm is the running total", "losses.py",
             "delta = now if self.last is None else [a - b for a, b in zip(now, self.last)]", "delta = now",
             (PREMISE + "test_grad_shares_are_each_terms_own_gradient_norm",)),
    # ---- premise.py: the meter
    Mutation("rescued without another expert's right answer", "premise.py",
             'm[f"rescued/{ex.name}"] = (wrong[:, i] & any_right)', 'm[f"rescued/{ex.name}"] = (wrong[:, i])',
             (PREMISE + "test_rescue_counts_questions_one_expert_fails_and_another_solves",)),
    Mutation("rescue rate counts every all-wrong question", "premise.py", '"rescue_rate": (wrong.any(-1) & any_right)',
             '"rescue_rate": (wrong.any(-1))', (PREMISE + "test_rescue_counts_questions_one_expert_fails_and_another_solves",)),
    Mutation("full-vocabulary transfer without lambda1", "riel.py",
             "micro_backward(cfg.lambda1 * loss)\n            losses.append(loss)\n        return read_sum(losses)",
             "micro_backward(loss)\n            losses.append(loss)\n        return read_sum(losses)",
             (RIEL + "test_full_vocab_transfer_gradient_is_lambda1_times_the_naive_kl_gradient",)),
    Mutation("buffer admission on the next expert's rewards", "buffer.py",
             "if not admit_hard_example(rewards[q, i], k, generator):",
             "if not admit_hard_example(rewards[q, (i + 1) % N], k, generator):",
             (RIEL + "test_the_buffer_admits_each_expert_on_its_own_groups_rewards",)),
    # ---- guard.py, checkpoint.py, runlog.py: a run never loses its work or silently lies (tests/test_faults.py)
    Mutation("resume accepts any changed option", "guard.py", "refused = [c for c in changes if c[0] not in allowed]",
             "refused = []", (FAULTS + "test_resume_refuses_a_change_of_what_the_run_computes_and_records_an_allowed_one",)),
    Mutation("a same-step save deletes the named checkpoint first", "checkpoint.py",
             'os.rename(final, final + ".prev")', "shutil.rmtree(final)",
             (FAULTS + "test_saving_the_same_step_twice_killed_between_its_renames_keeps_the_checkpoint",)),
    Mutation("a live lock taken over", "guard.py",
             "if host == socket.gethostname() and pid is not None and not _alive(pid):",
             "if host == socket.gethostname() and pid is not None:",
             (FAULTS + "test_a_second_run_on_the_same_directory_is_refused_and_a_stale_lock_taken_over",)),
    Mutation("a half-written last log line is an error", "runlog.py",
             "if n >= len(raw) - 1 and not any(x.strip() for x in raw[n:]):", "if False:",
             (FAULTS + "test_a_half_written_last_metrics_line_is_dropped_and_a_damaged_middle_one_named",)),
    Mutation("non-finite weights saved", "train.py",
             "if dist.is_main() and (bad := guard.non_finite((weights or model.state_dict()).items())):",
             "if False:", (FAULTS + "test_non_finite_weights_are_never_saved_nor_resumed",)),
    Mutation("taught counts E+ instead of E-", "premise.py",
             'm[f"taught/{ex.name}"] = m[f"e_minus/{ex.name}"] / max(1, rewards.shape[0])',
             'm[f"taught/{ex.name}"] = m[f"e_plus/{ex.name}"] / max(1, rewards.shape[0])',
             (DISJOINT + "test_taught_is_the_share_of_questions_where_the_expert_is_e_minus",)),
    Mutation("independent null counts the expert itself among the rescuers", "premise.py",
             'float(wrong[i] * (1 - np.prod(wrong[others])))', "float(wrong[i] * (1 - np.prod(wrong)))",
             (DISJOINT + "test_nulls_of_experts_that_fail_the_same_or_different_questions",
              DISJOINT + "test_the_independent_null_is_the_mean_over_independently_shuffled_questions")),
    Mutation("same-difficulty null with the experts at opposite quantiles", "premise.py",
             "else np.sort(rng.beta(*fit, size=draws))[::-1]",
             "else np.sort(rng.beta(*fit, size=draws))[::(-1) ** i]",
             (DISJOINT + "test_the_same_difficulty_null_recovers_a_comonotone_simulation",)),
    Mutation("Beta-binomial fit without the (G - 1)", "premise.py",
             "rho = (k.var() / (G * m * (1 - m)) - 1) / (G - 1)", "rho = (k.var() / (G * m * (1 - m)) - 1) / G",
             (DISJOINT + "test_beta_binomial_fit_recovers_its_parameters",)),
    Mutation("sft_cross keeps the non-owner's trace", "data/synthetic.py",
             "if name == OWNERS[testbed][kind] or cross_kept(rid, sft_cross)}",
             "if name != OWNERS[testbed][kind] or cross_kept(rid, sft_cross)}",
             (DISJOINT + "test_at_p0_each_expert_gets_only_its_own_shapes_traces_and_at_p1_all",)),
    Mutation("the cross dose not monotone in p", "data/synthetic.py",
             'return zlib.crc32(f"{question_id}/cross".encode()) / 2**32 < p',
             'return zlib.crc32(f"{question_id}/cross/{p}".encode()) / 2**32 < p',
             (DISJOINT + "test_the_cross_dose_is_a_stable_monotone_share_of_the_questions",)),
    Mutation("the control's replay shuffled", "train.py", "shuffle=not cfg.sft_replay", "shuffle=True",
             (REPLAY,)),
    Mutation("the control replays the record's first trace", "train.py",
             "encode_target(tok, reference_trace(rec, ex))", "encode_target(tok, next(iter(rec.traces.values())))",
             (REPLAY,)),
    # ---- data/synthetic.py: the testbeds and the split
    Mutation("placebo experts get three trace formats", "data/synthetic.py",
             "traces = {e.name: columns_trace(terms) for e in experts(testbed)}",
             "traces = {e.name: f(terms) for e, f in zip(experts(testbed), (chain_trace, columns_trace, reverse_trace))}",
             (T + "test_data_synthetic.py::test_placebo_testbed_is_the_nested_questions_with_one_trace_format_under_three_names",)),
    Mutation("complementary many-term shape one term short", "data/synthetic.py",
             "for _ in range(3 + difficulty if few else 4 + 2 * difficulty)]",
             "for _ in range(3 + difficulty if few else 3 + 2 * difficulty)]",
             (T + "test_data_synthetic.py::test_complementary_testbed_mixes_many_small_terms_and_two_long_ones",)),
    # ---- experiments/fair_ablation.py: choices on validation
    Mutation("lr sweep chosen on test", "experiments/fair_ablation.py",
             'key = "after_mef@val" if row == CONTROL else "after_riel@val"',
             'key = "after_mef" if row == CONTROL else "after_riel"',
             (T + "test_fair_ablation.py::test_the_lr_and_the_prompt_are_chosen_on_validation_never_on_test",)),
    # ---- losses.py
    Mutation("meml without max(A, 0)", "losses.py", "return centred.clamp(min=0)", "return centred",
             (LOSSES + "test_advantages_match_reference_vectors",)),
    Mutation("grpo std without Bessel", "losses.py", "std = rewards.std(-1, keepdim=True)",
             "std = rewards.std(-1, keepdim=True, unbiased=False)", (LOSSES + "test_advantages_match_reference_vectors",)),
    Mutation("clipped surrogate takes the max", "losses.py", "return -torch.minimum(ratio * adv,",
             "return -torch.maximum(ratio * adv,", (LOSSES + "test_clipped_surrogate_matches_trl_per_token_values",)),
    Mutation("k3 sign flipped", "losses.py", "d = ref_logp - logp", "d = logp - ref_logp",
             (LOSSES + "test_k3_value_and_gradient_match_reference", K3)),
    Mutation("token mean per micro-batch", "losses.py", "return sums.sum() / n_tokens", "return sums.sum() / mask.sum()",
             (LOSSES + "test_micro_batches_with_global_count_add_up_to_full_batch",)),
    Mutation("seq mean over padded length", "losses.py", "(sums / mask.sum(-1).clamp(min=1)).sum() / n_seqs",
             "(sums / per_token.shape[1]).sum() / n_seqs", (LOSSES + "test_aggregations_reproduce_trl_loss_types",)),
    Mutation("transfer sign flipped", "losses.py", "aggregate(teacher_logp.detach() - student_logp, mask",
             "aggregate(student_logp - teacher_logp.detach(), mask",
             (LOSSES + "test_transfer_loss_value_and_gradient_only_on_student_side",)),
    Mutation("transfer teacher scored under P-", "riel.py", "teacher, _ = token_logprobs(model, [pairs[i][0] for i in mb]",
             "teacher, _ = token_logprobs(model, [pairs[i][1] for i in mb]",
             (RIEL + "test_transfer_term_value_and_gradient_flow_only_through_the_weak_expert",)),
    # autocast's cache between no_grad and grad-enabled forwards (pytorch/pytorch#112583): the order is what torch
    # 2.13 can check; on torch < 2.11 the gradient test fails too
    Mutation("sampling's casts kept for training", "riel.py",
             "torch.clear_autocast_cache()  # casts cached while sampling (no_grad)", "pass  # casts cached while sampling",
             (AUTOCAST_ORDER,)),
    Mutation("transfer teacher's casts kept for the student", "riel.py",
             "torch.clear_autocast_cache()  # the teacher's no_grad casts: no gradient", "pass  # the teacher's casts",
             (AUTOCAST_ORDER,)),
    Mutation("full-vocab teacher's casts kept for the student", "riel.py",
             "torch.clear_autocast_cache()  # the teacher's no_grad casts give no gradient", "pass  # the teacher's",
             (AUTOCAST_ORDER,)),
    Mutation("micro-batch casts kept: bf16 weight gradients pile up", "optim.py",
             "    torch.clear_autocast_cache()\n\n\ndef sft_loss", "    pass\n\n\ndef sft_loss",
             (T + "test_plan.py::test_bf16_weight_gradients_do_not_pile_up_over_a_backward",)),
    Mutation("plan: backward with CPU's autocast cache lifetime", "plan.py",
             "with backward_thread() if cuda_backward else nullcontext():", "with nullcontext():",
             (T + "test_plan.py::test_cuda_backward_frees_the_forwards_bf16_copies_and_lowers_the_training_peaks",)),
    Mutation("full-vocab KL reversed", "losses.py", "kl = (t.exp() * (t - s)).sum(-1)", "kl = (s.exp() * (s - t)).sum(-1)",
             (LOSSES + "test_full_vocab_kl_equals_torch_kl_div",)),
    # ---- buffer.py
    Mutation("buffer admits with exactly K wrong", "buffer.py", "if int((group_rewards < CORRECT).sum()) <= k:",
             "if int((group_rewards < CORRECT).sum()) < k:", (RIEL + "test_buffer_never_admits_with_k_or_fewer_wrong",)),
    Mutation("buffer admission probability (K+1)/G", "buffer.py", "return uniform(generator) < k / G",
             "return uniform(generator) < (k + 1) / G", (RIEL + "test_buffer_admission_rate_is_k_over_g",)),
    Mutation("buffer entry holds another expert's prompt", "buffer.py", "prompts[q * N + i], encode_target",
             "prompts[q * N], encode_target", (BUFFER_STEP,)),
    Mutation("buffer reference: always the first trace", "buffer.py", "return record.traces.get(expert.name) or next(",
             "return next(", (BUFFER_STEP,)),
    Mutation("buffer flush not counted", "buffer.py", "self.flushes += 1", "self.flushes += 0",
             (RIEL + "test_buffer_flush_clears_and_counts",)),
    Mutation("buffer full one entry late", "buffer.py", "return len(self.entries) >= self.capacity",
             "return len(self.entries) > self.capacity", (RIEL + "test_buffer_flush_clears_and_counts",)),
    Mutation("exact flush drops the entries that should wait", "buffer.py",
             "self.entries[len(self.entries) if n is None else n:]", "[]",
             (PREMISE + "test_exact_flush_takes_the_b_oldest_entries_and_the_rest_wait",)),
    Mutation("buffer entries lost in a checkpoint", "buffer.py", 'cls(d["capacity"], [HardExample(**e) for e in d["entries"]],',
             'cls(d["capacity"], [],', (RIEL + "test_buffer_round_trips_through_a_plain_json_dict",)),
    # ---- mef.py
    Mutation("SFT target without end-of-turn", "mef.py", "add_special_tokens=False) + [end_of_turn_id(tok)]",
             "add_special_tokens=False)", (BUFFER_STEP,)),
    Mutation("SFT token mean per micro-batch", "optim.py", "return -(logp * mask).sum() / n_tokens",
             "return -(logp * mask).sum() / mask.sum()", (MEF + "test_micro_batches_give_the_full_batch_loss_and_gradient",)),
    Mutation("SFT weight dropped", "optim.py", "micro_backward(weight * loss)", "micro_backward(loss)", (BUFFER_STEP,)),
    Mutation("last micro-batch dropped", "optim.py", "for s in range(0, len(order), micro_batch_size)]",
             "for s in range(0, len(order) - 1, micro_batch_size)]",
             (MEF + "test_length_sorted_micro_batches_cover_every_index_once",)),
    Mutation("MEF lr one step ahead of the schedule", "mef.py", 'group["lr"] = lr_at(step - 1)', 'group["lr"] = lr_at(step)',
             (TRAIN + "test_smoke_run_writes_metrics_checkpoint_and_summary",)),
    Mutation("MEF resume repeats a step", "mef.py", "if step <= start_step:", "if step < start_step:",
             (MEF + "test_mef_resumed_at_a_step_takes_the_same_batches_as_an_uninterrupted_run",)),
    # ---- optim.py: host syncs
    Mutation("a host read per micro-batch", "optim.py", "        losses.append(loss)\n    return read_sum(losses)",
             "        losses.append(loss.item() * torch.ones(()))\n    return read_sum(losses)",
             (T + "test_optim.py::test_sft_backward_reads_the_device_once_however_many_micro_batches",)),
    Mutation("clip fraction computed on-policy", "riel.py", "        if not on_policy:  # the ratio is exactly 1",
             "        if True:  # the ratio is exactly 1",
             (T + "test_optim.py::test_policy_gradient_backward_syncs_per_term_not_per_micro_batch_and_skips_on_policy_clipping",)),
    # ---- mel.py
    Mutation("MEL replay checked against the first record", "mel.py", "reward_fn(records[pairs[i][0]], text(ids))",
             "reward_fn(records[0], text(ids))", (MEL + "test_each_replay_is_checked_against_its_own_questions_answer",)),
    Mutation("MEL replay under the right answer's expert", "mel.py", "experts[(pairs[i][1] // G) % N]",
             "experts[(pairs[i][2] // G) % N]",
             (MEL + "test_analysis_prompt_holds_the_rollouts_and_replay_uses_the_wrong_experts_prompt",)),
    Mutation("MEL analysis shows the right attempt first", "mel.py",
             "{wrong.strip()}\\n\\nCorrect attempt:\\n{right.strip()}", "{right.strip()}\\n\\nCorrect attempt:\\n{wrong.strip()}",
             (MEL + "test_analysis_prompt_shows_question_then_the_incorrect_solution_first",)),
    Mutation("MEL NLL over the padded length", "mel.py", "per_sample = (logp * mask).sum(-1) / mask.sum(-1)",
             "per_sample = (logp * mask).sum(-1) / mask.shape[1]",
             (MEL + "test_nll_is_the_per_sample_token_mean_over_the_analysis_tokens_only",)),
    Mutation("MEL pairs capped at one", "mel.py", "for k in order[:pairs_per_question]:", "for k in order[:1]:",
             (MEL + "test_only_mixed_questions_give_pairs_and_the_cap_holds",)),
    Mutation("MEL NLL mean per micro-batch", "mel.py", "[mine[i][1] for i in mb], len(examples))",
             "[mine[i][1] for i in mb], len(mb))", (MEL + "test_nll_micro_batches_give_the_full_batch_gradient",)),
    # ---- eval.py
    Mutation("per-expert accuracy of expert 0 only", "eval.py", "acc = {e.name: sum(checks[q * N + i][0] for q",
             "acc = {e.name: sum(checks[q * N][0] for q", (EVAL_SCRIPT,)),
    Mutation("vote over one expert", "eval.py", "[checks[q * N + i][1] for i in range(N)]",
             "[checks[q * N + i][1] for i in range(1)]", (EVAL_SCRIPT,)),
    Mutation("best expert is the worst", "eval.py", "best = max(acc, key=acc.get)", "best = min(acc, key=acc.get)",
             (EVAL_SCRIPT,)),
    Mutation("pass@k computed as pass@1", "eval.py", "scores.append(pass_at_k(n, int(c), k))",
             "scores.append(pass_at_k(n, int(c), 1))", (EVAL_SCRIPT,)),
    Mutation("pass@k = 1 when n - c == k", "eval.py", "return 1.0 if n - c < k else", "return 1.0 if n - c <= k else",
             (EVAL_SCRIPT,)),
    Mutation("vote ties go to the last expert", "eval.py", "winner = next(p for p in parsed if",
             "winner = next(p for p in reversed(parsed) if", (EVAL_SCRIPT,)),
    Mutation("pass@k samples checked against another record", "eval.py", "records[p // N].answer",
             "records[p % N].answer", (EVAL_SCRIPT,)),
    # ---- rollout.py
    Mutation("greedy takes the least likely token", "rollout.py", "return logits.argmax(dim=-1)",
             "return logits.argmin(dim=-1)", (ROLL + "test_greedy_equals_transformers_generate_with_stop_tokens",)),
    Mutation("log-probs ignore the temperature", "rollout.py",
             "return logits.div_(temperature) if temperature != 1.0 else logits", "return logits",
             (ROLL + "test_token_logprobs_equals_naive_log_softmax",)),
    Mutation("top-p drops the token that reaches p", "rollout.py", "mass_before = sorted_p.cumsum(dim=-1) - sorted_p",
             "mass_before = sorted_p.cumsum(dim=-1)", (ROLL + "test_top_p_keeps_exactly_the_nucleus",)),
    Mutation("completion loses its stop token", "rollout.py", "completions.append(row if end is None else row[:end + 1])",
             "completions.append(row if end is None else row[:end])",
             (ROLL + "test_greedy_equals_transformers_generate_with_stop_tokens",)),
    Mutation("log-probs read one position late", "rollout.py", "h = hidden[rows, pos - 1]", "h = hidden[rows, pos]",
             (ROLL + "test_token_logprobs_equals_naive_log_softmax",)),
    Mutation("left-padded rows keep the pads' positions", "rollout.py",
             "positions = (valid.cumsum(dim=1) - 1).clamp(min=0)",
             "positions = torch.arange(Tp, device=device).expand(P, Tp)",
             (ROLL + "test_each_padded_row_equals_its_prompt_decoded_alone",)),
    Mutation("decode positions rebound each token", "rollout.py", "        next_pos += 1  # in place",
             "        next_pos = next_pos + 1  # in place",
             (T + "test_speed.py::test_graph_ready_step_reads_its_inputs_in_place_and_refuses_new_ones",)),
    Mutation("graph replays its first token", "rollout.py", "        self.tok.copy_(tok)\n", "        pass\n",
             (T + "test_speed.py::test_speed_options_give_the_plain_paths_tokens",)),
    # ---- model.py
    Mutation("RoPE turns the wrong way", "model.py", "torch.cat([-sin, sin], dim=-1)", "torch.cat([sin, -sin], dim=-1)",
             (T + "test_model.py::test_rmsnorm_and_rope_reference_vectors",)),
    Mutation("RMSNorm without eps", "model.py", "eps=self.eps).to(x.dtype)", "eps=1.0).to(x.dtype)",
             (T + "test_model.py::test_rmsnorm_and_rope_reference_vectors",)),
    # ---- verify.py
    Mutation("gsm8k scores the first answer", "verify.py", "value = parse_number(found[-1])",
             "value = parse_number(found[0])", (VERIFY + "test_only_the_last_of_two_answers_counts",)),
    Mutation("strategyqa gold 'false' read as yes", "verify.py", '"no": "no", "false": "no"}', '"no": "no", "false": "yes"}',
             (VERIFY + "test_tricky_completions_score_as_expected",)),
    # ---- train.py: the schedule and what a resume restores
    Mutation("cosine decays to 0, not 10%", "mef.py", "return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(",
             "return cfg.lr * (0.5 * (1 + math.cos(", (SCHEDULE,)),
    Mutation("warmup starts at 0", "mef.py", "return cfg.lr * (step + 1) / cfg.warmup_steps",
             "return cfg.lr * step / cfg.warmup_steps", (SCHEDULE,)),
    Mutation("RL warmup starts at 0", "train.py", "rc.lr * min(1.0, (step + 1) / max(1, rc.warmup_steps))",
             "rc.lr * min(1.0, step / max(1, rc.warmup_steps))",
             (TRAIN + "test_placebo_testbed_with_a_validation_eval_rl_warmup_and_every_fairness_switch",)),
    Mutation("resume forgets the RIEL generator", "train.py", 'generator.set_state(state["generator"])', "pass",
             (MID_RIEL,)),
    Mutation("resume forgets the buffer", "train.py", 'buffer = HardExampleBuffer.from_dict(state["buffer"])',
             "buffer = HardExampleBuffer(rc.buffer_size)", (MID_RIEL,)),
    Mutation("RIEL checkpoint one step behind", "train.py", 'save("riel", step + 1, opt, generator, buffer)',
             'save("riel", step, opt, generator, buffer)',
             (MID_RIEL,)),
    Mutation("resume copies the reference from the resumed policy", "train.py",
             "lora.BaseModel(model) if cfg.lora_rank else checkpoint.reference_model(",
             "lora.BaseModel(model) if cfg.lora_rank else (lambda *a: __import__('copy').deepcopy(model))(",
             (MID_RIEL,)),
    # ---- lora.py: the adapters, the reference, the checkpoint
    Mutation("LoRA B starts non-zero", "lora.py", "self.lora_B = nn.Parameter(torch.zeros(",
             "self.lora_B = nn.Parameter(0.01 + torch.zeros(", (LORA + "test_at_init_a_lora_model_is_its_base_bit_for_bit",)),
    Mutation("adapters_off leaves the adapters on", "lora.py", "        m.enabled = False", "        m.enabled = True",
             (LORA + "test_the_reference_log_probs_are_the_base_models",)),
    Mutation("merge forgets alpha / r", "lora.py", "delta = scale * (state[prefix", "delta = 1.0 * (state[prefix",
             (LORA + "test_checkpoint_is_the_merged_model_that_transformers_loads",)),
    Mutation("LoRA forward drops alpha / r", "lora.py", "F.linear(F.linear(h, self.lora_A) * self.scale, self.lora_B)",
             "F.linear(F.linear(h, self.lora_A), self.lora_B)",
             (LORA + "test_a_lora_linear_is_w_x_plus_b_plus_alpha_over_r_b_a_x_with_its_gradients",)),
    Mutation("each rank decides itself whether to write the LoRA base (a late rank skips the barrier)", "lora.py",
             "ckpt is None and dist.from_main(lambda: not os.path.exists(os.path.join(base_path(out_dir), "
             "\"config.json\")))", "ckpt is None and not os.path.exists(os.path.join(base_path(out_dir), "
             "\"config.json\"))", (WRITE_ONCE,)),
]


def source_files() -> list:
    """What a clean clone would hold, plus files not yet committed (git's view: tracked, or untracked and not
    ignored), so that the check runs on the work in progress."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split("\n")
    return [f for f in out if f and (ROOT / f).is_file()]


def project_copy(workdir: Path, files: list) -> Path:
    """A copy of the project at workdir/repo, with ../shared beside it as a link (the tests look there)."""
    repo = workdir / "repo"
    for f in files:
        (repo / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, repo / f)
    if (ROOT.parent / "shared").exists():
        (workdir / "shared").symlink_to(ROOT.parent / "shared")
    return repo


def apply(repo: Path, m: Mutation):
    path = repo / m.file
    text = path.read_text()
    if text.count(m.old) != 1:
        raise ValueError(f"{m.name}: {m.old!r} occurs {text.count(m.old)} times in {m.file}, not once")
    path.write_text(text.replace(m.old, m.new))


def run_tests(repo: Path, tests, timeout) -> tuple:
    """pytest on the copy, one process of one thread, stopping at the first failure -> (status, seconds)."""
    env = {**os.environ, "TEST_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-n", "0", "-p", "no:cacheprovider", *tests]
    t0 = time.time()
    try:
        rc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        return "timeout", time.time() - t0
    return {0: "passed", 1: "failed"}.get(rc, f"error {rc}"), time.time() - t0


def check(m: Mutation | None, files, tests, timeout) -> tuple:
    with tempfile.TemporaryDirectory(prefix="mutate-") as tmp:
        repo = project_copy(Path(tmp), files)
        if m is not None:
            apply(repo, m)
        return run_tests(repo, tests, timeout)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--only", default=None, help="run the mutations whose name contains this text")
    ap.add_argument("--jobs", type=int, default=2, help="mutations checked at once (one thread each)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per mutation's tests (a timeout counts as caught)")
    ap.add_argument("--list", action="store_true", help="print the mutations and their tests, run nothing")
    a = ap.parse_args(argv)
    chosen = [m for m in MUTATIONS if a.only is None or a.only.lower() in m.name.lower()]
    if a.list or not chosen:
        for i, m in enumerate(chosen, 1):
            print(f"{i:>2} {m.file:<10} {m.name}\n   {' '.join(m.tests)}")
        return 0 if chosen else 2
    files, t0 = source_files(), time.time()
    needed = sorted({t for m in chosen for t in m.tests})
    status, secs = check(None, files, needed, a.timeout * 2)
    print(f"unmutated copy: the {len(needed)} tests {status} ({secs:.0f} s)", flush=True)
    if status != "passed":
        print("the tests must pass on the unmutated code first: fix them, then run this again")
        return 2
    rows = [None] * len(chosen)

    def one(i):
        rows[i] = check(chosen[i], files, list(chosen[i].tests), a.timeout)
        print(f"  {i + 1:>2}/{len(chosen)} {rows[i][0]:<8} {chosen[i].name}", flush=True)
    with ThreadPoolExecutor(a.jobs) as pool:
        list(pool.map(one, range(len(chosen))))
    print("\n| # | file | mutation | tests | result | s |\n|---|---|---|---|---|---|")
    missed = 0
    for i, (m, (status, secs)) in enumerate(zip(chosen, rows), 1):
        caught = status != "passed"
        missed += not caught
        tests = ", ".join(t.split("::")[-1] if "::" in t else t for t in m.tests)
        print(f"| {i} | {m.file} | {m.name} | {tests} | {'caught' if caught else 'MISSED'}"
              f"{'' if status == 'failed' or not caught else f' ({status})'} | {secs:.0f} |")
    print(f"\n{len(chosen) - missed} of {len(chosen)} mutations caught, {missed} missed "
          f"({time.time() - t0:.0f} s, {a.jobs} at a time)")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
