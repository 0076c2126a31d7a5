"""Solutions to the exercises of notebook 05 (trie SFT).

Each `# %% Exercise N` block is the content of the empty cell under exercise N. tests/test_exercises.py runs
the notebook with these blocks in the empty cells and checks that every check cell prints
"Exercise N: correct".
"""

# %% Exercise 1
nodes_1 = 2 + 2 + (1 + 2) + (1 + 2) + 4   # prompt, header, thread 1, thread 2, continuation: its 11 7 8 9 are new
trained_1 = 2 + 2 + 2 + 1                 # the completions, each node once
trained_paper_1 = nodes_1 - 2             # every node but the two prompt nodes

# %% Exercise 2
# depth-first: 1 2 3 4, then thread 1's branch 10 5 6 with the continuation's 11 7 8 9 below it,
# then thread 2's branch 11 7 8
node_2 = 13
attends_2 = [0, 1, 2, 3, 11, 12, 13]      # 1 2 3 4, then its own 11 7 8
leaked_2 = node_2 + 1 - len(attends_2)    # everything else before it in the row: rows 4..10

# %% Exercise 3
factors_3 = [1 / 2, 2 / 2, 1.0, 0.2 + 0.8 * 0.5, 0.2]   # warm-up; cosine start; halfway (5/10); the end

# %% Exercise 4
def row_mean_loss(model, batch):
    lp = logprobs(model, batch)
    trained = batch.labels != IGNORE
    per_row = -(lp * trained).sum(dim=1) / trained.sum(dim=1).clamp(min=1)
    return per_row.mean()
