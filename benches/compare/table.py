"""The comparison table from one run: our bench report beside the alternatives.

    python table.py OURS.jsonl ALTERNATIVES.jsonl

Ratios are the alternative's forward + backward time over our CPU backend's
exact top-k (the default solver) at the same size, both from the files given,
so from the same run. Standard library only.
"""

import json
import sys

# Issue #6's targets at 256 x 4096: how many times faster than each alternative.
TARGET_SIZE = (256, 4096)
TARGETS = {"ott_jax": 100.0, "ott_jax_default": 100.0, "paper_torch": 200.0}
TARGET_MASK_ERROR = 1e-5


def read_lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.startswith("{")]


def main():
    ours_path, alternatives_path = sys.argv[1:3]
    ours = [
        line for line in read_lines(ours_path)
        if line["backend"] == "cpu" and line["variant"] == "topk"
    ]
    alternatives = read_lines(alternatives_path)
    exact = {(o["rows"], o["n"]): o for o in ours if o["solver"] == "exact"}

    header = (
        f"{'rows x n':>11}  {'implementation':<28} {'forward s':>10} "
        f"{'fwd+bwd s':>10} {'mask err':>9} {'non-fin':>7} {'ratio':>8}  load"
    )
    print(header)
    print("-" * len(header))
    for size in sorted(exact, key=lambda s: s[0] * s[1]):
        base = exact[size]["forward_backward_s"]
        rows = [o for o in ours if (o["rows"], o["n"]) == size]
        rows += [a for a in alternatives if (a["rows"], a["n"]) == size]
        for line in rows:
            name = line["backend"] + "/" + line["solver"]
            load = line.get("loadavg_start"), line.get("loadavg_end")
            load = f"{load[0][0]:.2f} -> {load[1][0]:.2f}" if load[0] else ""
            print(
                f"{size[0]:>4} x {size[1]:<5}  {name:<28} "
                f"{line['forward_s']:>10.3g} {line['forward_backward_s']:>10.3g} "
                f"{line['max_mask_error']:>9.2g} {line['non_finite_grad']:>7} "
                f"{line['forward_backward_s'] / base:>7.1f}x  {load}"
            )

    if TARGET_SIZE not in exact:
        return
    ours_line = exact[TARGET_SIZE]
    print(f"\nIssue #6 at {TARGET_SIZE[0]} x {TARGET_SIZE[1]} (forward + backward):")
    error_ok = ours_line["max_mask_error"] <= TARGET_MASK_ERROR
    print(
        f"  ours: mask error {ours_line['max_mask_error']:.2g} "
        f"(target <= {TARGET_MASK_ERROR:g}: {'met' if error_ok else 'NOT met'}), "
        f"non-finite gradients {ours_line['non_finite_grad']}"
    )
    for line in alternatives:
        if (line["rows"], line["n"]) != TARGET_SIZE:
            continue
        target = TARGETS.get(line["backend"])
        ratio = line["forward_backward_s"] / ours_line["forward_backward_s"]
        verdict = "met" if target and ratio >= target else "NOT met"
        print(f"  vs {line['backend']}: {ratio:.1f}x (target >= {target:g}x: {verdict})")


if __name__ == "__main__":
    main()
