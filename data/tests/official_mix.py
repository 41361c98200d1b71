"""An independent oracle of the official EfficientNetV2 Mixup and CutMix.

Written here from the definitions in google/automl's efficientnetv2/datasets.py (`mixup`,
`cutmix_mask`, `cutmix`, `mixing`): given the same raw draws (the Beta draws and the box
centers), it rebuilds each micro-batch's mixing and checks Ladder's; then it tests Ladder's Beta
draws against Beta(alpha, alpha) with a Kolmogorov-Smirnov test (scipy).

Usage: official_mix.py PLANS.json. Exits non-zero naming the first difference.
"""

import json
import math
import sys

from scipy import stats


def expected_rows(plan):
    rows, size = plan["rows"], plan["size"]
    mixup, cutmix = plan["mixup_alpha"] > 0, plan["cutmix_alpha"] > 0
    # `mixing`: both on, the first half mixes up and the second half cuts.
    if mixup and cutmix:
        mixed, cut = range(0, rows // 2), range(rows // 2, rows)
    elif mixup:
        mixed, cut = range(0, rows), range(rows, rows)
    else:
        mixed, cut = range(0, 0), range(0, rows)
    draws, centers = iter(plan["beta_draws"]), iter(plan["centers"])
    out = [None] * rows
    for i in mixed:
        # `mixup`: a weight per row, folded to at least 1/2; partner: the reversed batch.
        w = next(draws)
        out[i] = {"kind": "mixup", "partner": mixed.start + mixed.stop - 1 - i, "weight": max(w, 1 - w)}
    boxes = []
    for i in cut:
        # `cutmix_mask`: center uniform, sides int(sqrt(1 - area) * size), clipped.
        r_y, r_x = next(centers)
        area = next(draws)
        patch = math.sqrt(1 - area)
        r_w, r_h = int(patch * size), int(patch * size)
        clip = lambda v: min(max(v, 0), size)
        box = [clip(r_y - r_h // 2), clip(r_y + r_h // 2), clip(r_x - r_w // 2), clip(r_x + r_w // 2)]
        boxes.append(box)
        out[i] = {"kind": "cutmix", "partner": cut.start + cut.stop - 1 - i, "cut": box}
    # `cutmix`: the label weight is the mask's mean over the whole (half) batch.
    if boxes:
        area = sum((b[1] - b[0]) * (b[3] - b[2]) for b in boxes) / (len(boxes) * size * size)
        for i in cut:
            out[i]["label_weight"] = area
    return out


def main():
    data = json.loads(open(sys.argv[1]).read())
    for n, plan in enumerate(data["plans"]):
        for i, (ours, theirs) in enumerate(zip(plan["ladder"], expected_rows(plan))):
            for key, value in theirs.items():
                mine = ours.get(key)
                same = abs(mine - value) < 1e-12 if isinstance(value, float) else mine == value
                if not same:
                    sys.exit(f"plan {n} row {i}: {key} is {mine}, the official code's {value}")
    worst = 1.0
    for alpha, draws in data["beta_samples"].items():
        result = stats.kstest(draws, "beta", args=(float(alpha), float(alpha)))
        print(f"Beta({alpha}, {alpha}): {len(draws)} draws, KS statistic {result.statistic:.4f}, p {result.pvalue:.3f}")
        worst = min(worst, result.pvalue)
    if worst < 0.01:
        sys.exit(f"a Beta sample fails its KS test (p = {worst:.4f})")


if __name__ == "__main__":
    main()
