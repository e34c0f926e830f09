"""Plot the training (and evaluation) loss of a run's logging.jsonl into a PNG."""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(jsonl: str, png: str) -> None:
    train, evals = [], []
    for line in open(jsonl):
        rec = json.loads(line)
        if "loss" in rec:
            train.append((rec["iteration"], rec["loss"]))
        if "eval_loss" in rec:
            evals.append((rec["iteration"], rec["eval_loss"]))
    plt.figure(figsize=(6, 4))
    plt.plot(*zip(*train), alpha=0.35, label="train loss")
    k = max(1, len(train) // 8)  # moving average: per-batch losses are noisy at 8 samples a step
    smooth = [sum(l for _, l in train[max(0, i - k + 1):i + 1]) / len(train[max(0, i - k + 1):i + 1])
              for i in range(len(train))]
    plt.plot([i for i, _ in train], smooth, label=f"train loss ({k}-step mean)")
    if evals:
        plt.plot(*zip(*evals), "o-", label="eval loss")
    plt.xlabel("iteration")
    plt.ylabel("loss")
    plt.legend()
    plt.grid(alpha=0.3)
    plt.tight_layout()
    plt.savefig(png, dpi=120)
    print(f"loss {train[0][1]:.4f} -> {train[-1][1]:.4f} over {len(train)} logged steps; curve: {png}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
