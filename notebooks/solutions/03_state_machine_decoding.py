"""Solutions to the exercises of notebook 03 (state-machine decoding).

Each `# %% Exercise N` block is the content of the empty cell under exercise N. tests/test_exercises.py runs
the notebook with these blocks in the empty cells and checks that every check cell prints
"Exercise N: correct".
"""

# %% Exercise 1
forked_1 = 120 + 3 * 4  # P + k p: the shared context once, then each thread's prefix
separate_1 = 3 * (120 + 4)  # k (P + p)

# %% Exercise 2
batched_2 = 30  # the longest thread
serial_2 = 12 + 30 + 18  # every thread's tokens


# %% Exercise 3
def script_3(req):
    if is_thread(req):
        return enc("y\n</Thread>")
    if outlines_close not in req.prompt_ids:  # the first call: a plan of six threads
        return outlines(*[f"{i}:g{i}" for i in range(1, 7)])
    return enc("</Parallel>\ndone") + [eos]  # the continuation after the join
