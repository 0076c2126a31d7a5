"""Solutions to the exercises of notebook 00 (the overview).

Each `# %% Exercise N` block is the content of the empty cell under exercise N. tests/test_exercises.py runs
the notebook with these blocks in the empty cells and checks that every check cell prints
"Exercise N: correct".
"""

# %% Exercise 1
reward_a = 1 + min(0.5 * 0.3, 0.2)  # 1.15
reward_b = 1 + min(0.5 * 0.6, 0.2)  # 1.2: the bonus is clipped
reward_c = 0.0  # wrong: no bonus

# %% Exercise 2
rewards = [1.2, 1.0, 0.0, 1.1]
advantages_2 = [r - sum(rewards) / len(rewards) for r in rewards]  # the mean is 0.825
print(advantages_2)
