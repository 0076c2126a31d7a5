"""Solutions to the exercises of notebook 01 (the trajectory format).

Each `# %% Exercise N` block is the content of the empty cell under exercise N. tests/test_exercises.py runs
the notebook with these blocks in the empty cells and checks that every check cell prints
"Exercise N: correct".
"""

# %% Exercise 1
answer_1 = (
    "<Parallel>\n<Outlines>\n"
    "<Outline>1: add 2 and 3</Outline>\n"
    "<Outline>2: add 4 and 5</Outline>\n"
    "<Outline>3: add 6 and 7</Outline>\n"
    "</Outlines>\n"
    "<Thread>\n1: 2+3=5\n</Thread><Thread>\n2: 4+5=9\n</Thread><Thread>\n3: 6+7=13\n</Thread>\n"
    "</Parallel>\n"
    "5+9+13=27\n"
)

# %% Exercise 2
before = 3  # a, b, <Parallel>
header = 17  # \n <Outlines> \n, then 2 x (<Outline> n : letter </Outline> \n), then </Outlines> \n
wrappers = 4  # <Thread> </Thread> <Thread> </Thread>
body_lengths = [5, 6]  # \n 1 : p \n  and  \n 2 : q q \n
after = 3  # \n (the tail) </Parallel> c
T_2 = before + header + wrappers + sum(body_lengths) + after
L_2 = before + header + wrappers + max(body_lengths) + after
print(f"T = {T_2}, L = {L_2}")

# %% Exercise 3
# three mistakes: a newline between the threads, thread 2 numbered 3, no newline before the last </Thread>
fixed = (broken.replace("</Thread>\n<Thread>", "</Thread><Thread>")
               .replace("<Thread>\n3:", "<Thread>\n2:")
               .replace("right is 5</Thread>", "right is 5\n</Thread>"))
print(fixed)
