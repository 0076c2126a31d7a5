"""Solutions to the exercises of notebook 07 (evaluation).

Each `# %% Exercise N` block is the content of the empty cell under exercise N. tests/test_exercises.py runs
the notebook with these blocks in the empty cells and checks that every check cell prints
"Exercise N: correct".
"""

# %% Exercise 1
per_problem = [s.seconds / p.seconds for p, s in zip(wall_pgrpo, wall_sequential)]
wall_mean_of_ratios = sum(per_problem) / len(per_problem)
print(f"mean of ratios {wall_mean_of_ratios:.3f}x, ratio of totals "
      f"{compare(wall_pgrpo, wall_sequential)['wall_clock_speedup']:.3f}x")

# %% Exercise 2
predicted_k1 = 1.0   # one group: no block, so L = T, and both models write the same sequential text
ups = speedups(eval_pgrpo, eval_sequential)
multi = [u for u, r in zip(ups, eval_pgrpo) if r.k >= 2]
speedup_multi = sum(multi) / len(multi)
print(f"k >= 2: {speedup_multi:.3f}x over {len(multi)} problems")

# %% Exercise 3
def pareto_front(points):
    # the names of the points that no other point dominates
    def dominated(latency, accuracy):
        return any(l2 <= latency and a2 >= accuracy and (l2, a2) != (latency, accuracy)
                   for l2, a2 in points.values())
    return {name for name, (latency, accuracy) in points.items() if not dominated(latency, accuracy)}


front = pareto_front(runs_points)
print(sorted(front))
