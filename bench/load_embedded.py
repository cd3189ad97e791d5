"""How long loading the embedded SmolLM2-135M-Instruct takes once it is converted (target: under 2 s).

Each measurement runs in a fresh Python process, so nothing is warm but the OS file cache.
Usage: python bench/load_embedded.py [--repeats 3]
"""

import argparse
import json
import subprocess
import sys

PROBE = r"""
import json, time
t0 = time.perf_counter()
import torch, transformers  # noqa: F401
from rlhfkit.models.embedded import ensure_embedded
from rlhfkit.models.loading import load_causal_lm, load_tokenizer
t1 = time.perf_counter()
ensure_embedded()
t2 = time.perf_counter()
tok = load_tokenizer("embedded")
t3 = time.perf_counter()
model = load_causal_lm("embedded")
t4 = time.perf_counter()
load_tokenizer("embedded"), load_causal_lm("embedded")  # a second load in the same process
t5 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "cache_check_s": t2 - t1, "tokenizer_s": t3 - t2, "model_s": t4 - t3,
                  "load_s": t4 - t1, "again_s": t5 - t4, "params_m": sum(p.numel() for p in model.parameters()) / 1e6}))
"""


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for i in range(args.repeats):
        out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'run':>4} {'import torch+hf (s)':>20} {'tokenizer (s)':>14} {'model (s)':>10} {'first load (s)':>15} "
          f"{'second load (s)':>16} {'params (M)':>11}")
    for i, r in enumerate(rows, 1):
        print(f"{i:>4} {r['import_s']:>20.2f} {r['tokenizer_s']:>14.2f} {r['model_s']:>10.2f} {r['load_s']:>15.2f} "
              f"{r['again_s']:>16.2f} {r['params_m']:>11.1f}")
    first, again = min(r["load_s"] for r in rows), min(r["again_s"] for r in rows)
    print(f"\nfirst load in a fresh process (includes transformers' lazy imports): {first:.2f} s; "
          f"second load: {again:.2f} s (target < 2 s: {'met' if again < 2 else 'NOT met'})")


if __name__ == "__main__":
    main()
