"""Solutions to the exercises of notebook 06 (P-GRPO).

Each `# %% Exercise N` block is the content of the empty cell under exercise N. tests/test_exercises.py runs
the notebook with these blocks in the empty cells and checks that every check cell prints
"Exercise N: correct".
"""

# %% Exercise 1
header = 20  # <think> \n <Parallel> \n <Outlines> \n, 2 x (<Outline> n : X </Outline> \n), </Outlines> \n
wrappers = 4  # <Thread> </Thread> <Thread> </Thread>
bodies = [7, 7]  # \n 1 : A = 3 \n  and  \n 2 : B = 4 \n
after = 5 + 15  # \n </Parallel> \n </think> \n, then \boxed{A=3 B=4}
T_1 = header + wrappers + sum(bodies) + after
L_1 = header + wrappers + max(bodies) + after
reward_1 = 1 + min(0.5 * (1 - L_1 / T_1), 0.2)
print(f"T = {T_1}, L = {L_1}, reward = {reward_1:.4f}")

# %% Exercise 2
r_2 = [1.2, 1.0, 0.0, 0.0]
mean_2 = sum(r_2) / 4  # 0.55
A_2 = [0.65, 0.45, -0.55, -0.55]
std_2 = math.sqrt(sum((x - mean_2) ** 2 for x in r_2) / 4)  # sqrt(1.23 / 4) = 0.5545
A_2_std = [a / std_2 for a in A_2]
print(f"A = {A_2}\nA / std = {[round(a, 3) for a in A_2_std]}")

# %% Exercise 3
bonus_3 = {
    "paper": min(0.5 * 0.3, 0.2),  # 0.15: not yet at the cap
    "code": 0.5 * min(0.3, 0.2),  # 0.10: eta is capped at 0.2 first
    "readme": 0.5 * min(10 / 7 - 1, 0.2),  # T/L - 1 = 0.43, capped at 0.2: 0.10
}
print(bonus_3)

# %% Exercise 4
count_41, weight_41 = 3, 0.9 - 0.3 - 0.3  # rollouts 0, 1, 2 pass through 41
count_42, weight_42 = 2, 0.9 - 0.3  # rollouts 0 and 2 wrote the same completion: one node

# %% Exercise 5
def leave_one_out_advantages(rewards):
    k = len(rewards)
    total = sum(rewards)
    return [r - (total - r) / (k - 1) for r in rewards]   # = k / (k - 1) * (r - mean): the same signs, scaled


print(leave_one_out_advantages([1.2, 1.0, 0.0, 0.0]))
