"""Solutions to the exercises of notebook 08 (full scale).

Each `# %% Exercise N` block is the content of the empty cell under exercise N. tests/test_exercises.py runs
the notebook with these blocks in the empty cells and checks that every check cell prints
"Exercise N: correct".
"""

# %% Exercise 1
logits_gib = 40960 * qwen3_8b.vocab * 4 / 2**30
print(f"{logits_gib:.1f} GiB of logits for one row: the reason the LM head runs in chunks")

# %% Exercise 2
fsdp_a100 = dataclasses.replace(reference_config, gpu="a100-40gb", sharding="fsdp", offload_optimizer=False)
fitting = [t for t in [8192, 16384, 24576, 32768, 40960]
           if plan.sft_memory(dataclasses.replace(fsdp_a100, tokens=t), qwen3_8b).fits]
longest_row = max(fitting)
print(f"longest row that fits: {longest_row} tokens")

# %% Exercise 3
# no signal = groups whose rollouts all earn the same reward: zero_std_groups near 1
for name, log in logs.items():
    print(f"{name:16s} zero_std_groups {log.zero_std_groups.mean():.2f}  reward_std {log.reward_std.mean():.3f}")
silent_runs = {name for name, log in logs.items() if log.zero_std_groups.mean() > 0.5}
