"""Solutions to the exercises of notebook 04 (data generation).

Each `# %% Exercise N` block is the content of the empty cell under exercise N. tests/test_exercises.py runs
the notebook with these blocks in the empty cells and checks that every check cell prints
"Exercise N: correct".
"""

# %% Exercise 1
share_1 = 50 / (50 + 10 + 5)  # 0.77
kept_1 = False  # above 0.75: the critical path would pay for almost the whole block

# %% Exercise 2
reply_2 = '{"blocks": [{"threads": [[1, 4], [5, 7]]}]}'  # A: lines 1-4 (A:... to A=9), B: lines 5-7

# %% Exercise 3
ratio_3 = 2 / 3  # two of the three trajectories have a block
threads_3 = 3.0  # both blocks have three threads; the sequential trace has no block to average
