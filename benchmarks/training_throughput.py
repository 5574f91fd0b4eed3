"""Training throughput: the full loop ÷ a bare forward+backward loop of the same model, same batch, same run.

Full loop: `lookalike.training.train.train` with the default `TrainConfig` — balanced sampler, decoded images,
augmentation (phone-photo simulation included) in the background loader thread, masked multitask CE
and the triplet loss, optimiser step. Bare loop: the same model, the same batch size, one in-memory
random tensor, cross-entropy on one head, backward and optimiser step — the cost of the network alone.

Rounds alternate bare and full so both see the same machine load; each rate skips the first steps
(allocation, the loader filling its queue). The reported ratio is the median of the per-round ratios
(paired under the same load, so robust to a busy machine); the rates beside it are the medians. The
last line reads
`throughput: full_loop=<a> img/s bare=<b> img/s ratio=<r>` (target ratio ≥ 0.8).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see retrieval_quality.py

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from retrieval_quality import fashion_mnist_bank  # noqa: E402
from lookalike.training.model import ModelConfig, create_model  # noqa: E402
from lookalike.training.train import TrainConfig, build_optimizer, train  # noqa: E402


def bare_rate(config: TrainConfig, heads: dict[str, list[str]], batch: int, steps: int, skip: int) -> float:
    model = create_model(ModelConfig(architecture=config.architecture, embedding_dim=config.embedding_dim,
                                     heads=heads, trainable_blocks=config.trainable_blocks,
                                     pretrained=config.pretrained, preprocessing=config.preprocessing()))
    model.train()
    optimizer = build_optimizer(model, config)
    x = torch.randn(batch, 3, config.image_size, config.image_size)
    task = next(iter(heads))
    y = torch.randint(0, len(heads[task]), (batch,))
    for step in range(steps):
        if step == skip:
            started = time.perf_counter()
        loss = F.cross_entropy(model(x)["logits"][task], y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return batch * (steps - skip) / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=25, help="steps per measurement (the first 5 are skipped)")
    args = parser.parse_args(argv)
    skip = 5
    config = TrainConfig(steps=args.steps)
    torch.set_num_threads(config.threads or os.cpu_count() or 1)
    catalog, bank = fashion_mnist_bank("test")
    heads = {t: sorted({r.labels[t] for r in bank.rows if t in r.labels})
             for t in ("category", "fine_category", "shade")}
    views = 2 if config.loss().uses_triplet else 1
    batch = config.samples_per_task * len(heads) * views
    print(f"batch {batch} images at {config.image_size} px ({config.objective}, {len(heads)} tasks), "
          f"{torch.get_num_threads()} threads; {args.rounds} alternating rounds of {args.steps} steps", flush=True)
    fulls, bares = [], []
    for r in range(args.rounds):
        bares.append(bare_rate(config, heads, batch, args.steps, skip))
        result = train(catalog, config, bank=bank, progress=False, seed=r)
        h = result.history
        fulls.append(batch * (len(h) - skip) / (h[-1]["time_s"] - h[skip - 1]["time_s"]))
        print(f"round {r + 1}: full loop {fulls[-1]:.1f} img/s, bare {bares[-1]:.1f} img/s, "
              f"ratio {fulls[-1] / bares[-1]:.2f}", flush=True)
    full, bare = statistics.median(fulls), statistics.median(bares)
    ratio = statistics.median(f / b for f, b in zip(fulls, bares))
    print(f"ratio of the median rates {full / bare:.2f}; median of the per-round ratios {ratio:.2f} (target >= 0.8)")
    print(f"throughput: full_loop={full:.1f} img/s bare={bare:.1f} img/s ratio={ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
