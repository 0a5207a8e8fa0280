"""The gap histogram of session33/README.md from gaps_s_n8.json (seconds from an answer to the same
client's next request, as the pool's batcher saw them, N = 8)."""
import json
import os

import numpy as np

g = np.array(json.load(open(os.path.join(os.path.dirname(__file__), "gaps_s_n8.json")))) * 1000
print(f"{len(g)} gaps; percentiles 10/25/50/75/90/95/98/99 (ms):", np.percentile(g, [10, 25, 50, 75, 90, 95, 98, 99]).round(1))
for lo, hi in [(0, 10), (10, 15), (15, 20), (20, 25), (25, 40), (40, 70), (70, 150), (150, np.inf)]:
    m = (g >= lo) & (g < hi)
    print(f"{lo:>4}-{hi:<5} ms: {m.sum():4d} gaps, {g[m].sum() / 1000:5.2f} s ({g[m].sum() / g.sum():.0%} of all gap time)")
