"""Solutions to the exercises of notebook 02 (trie packing and masking).

Each `# %% Exercise N` block is the content of the empty cell under exercise N. tests/test_exercises.py runs
the notebook with these blocks in the empty cells and checks that every check cell prints
"Exercise N: correct".
"""

# %% Exercise 1
nodes_1 = 8  # 7 8 9 are shared by all three calls; 1 2 3 are new in call 1; 4 2 are new in call 2
positions_1 = [0, 1, 2, 3, 4, 5, 3, 4]  # depth first: 7 8 9, the branch 1 2 3, then the branch 4 2

# %% Exercise 2
exits_2 = [8, 8, 8, 6, 6, 6, 8, 8]  # 7, 8, 9 hold the whole row; 1 2 3 end at index 6; 4 2 at the end


# %% Exercise 3
def visible(exits, q):
    return [k for k in range(q + 1) if q < exits[k]]
