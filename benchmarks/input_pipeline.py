"""Is the tf.data input pipeline the bottleneck? Images/s of the pipeline vs the model's training step rate.

Writes N processed PNGs (real ISIC images through tasks.preprocess.process_image when ../shared/data/isic-real
exists, else synthetic lesions) into a temp dir, then measures, per architecture:
  pipeline_first_img_s   first pass: read + PNG decode (parallel) + albumentations + batch (cache filling)
  pipeline_cached_img_s  later passes: from the decoded cache + albumentations (what every epoch after the first costs)
  train_step_img_s       model.train_on_batch on an in-memory batch (the compute ceiling)
  fit_img_s              model.fit on the real pipeline (what training actually achieves)
and prints one JSON table. `headroom` = pipeline_cached / train_step: > 1 means the pipeline keeps up.

    python benchmarks/input_pipeline.py --n 256 --size 224 --archs mobilenet:0.25 small_cnn
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "isic-real"


def write_images(out: Path, n: int, size: int, seed: int = 0) -> tuple[list[str], np.ndarray, str]:
    """N processed PNGs of size px; (files, targets, where they came from)."""
    from tasks.core.config import Preprocess
    from tasks.core.images import encode_png, process_image

    cfg = Preprocess(size=size)
    rng = np.random.default_rng(seed)
    files, targets = [], []
    if (REAL / "metadata.csv").exists():
        import pandas as pd

        meta = pd.read_csv(REAL / "metadata.csv").head(n)
        for i, row in enumerate(meta.itertuples()):
            img = process_image((REAL / f"{row.isic_id}.jpg").read_bytes(), cfg)
            f = out / f"{i:05d}.png"
            f.write_bytes(encode_png(img, 1))
            files.append(str(f))
            targets.append(int(row.benign_malignant == "malignant"))
        source = f"isic-real (first {len(files)})"
    else:
        for i in range(n):
            img = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            f = out / f"{i:05d}.png"
            f.write_bytes(encode_png(process_image(img, cfg), 1))
            files.append(str(f))
            targets.append(i % 3 == 0)
        source = "random noise"
    return files, np.asarray(targets, np.float32), source


def rate_of(it, batches: int) -> float:
    """Images/s drawing `batches` batches from an iterator."""
    t0, n = time.perf_counter(), 0
    for _ in range(batches):
        x, _ = next(it)
        n += int(x["image"].shape[0])
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=256, help="images")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8, help="timed train steps per architecture")
    ap.add_argument("--archs", nargs="+", default=["mobilenet:0.25", "small_cnn"], help="arch[:alpha]")
    ap.add_argument("--no-augment", action="store_true")
    args = ap.parse_args()

    import tensorflow as tf

    from tasks import train
    from tasks.core.config import Augment, Train
    from tasks.models.classifier import build_member
    from tasks.models.inputs import make_dataset

    tf.config.experimental.enable_op_determinism()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        files, y, source = write_images(Path(tmp), args.n, args.size)
        prep_s = time.perf_counter() - t0
        augment = None if args.no_augment else train.make_augment(Augment(), args.size, 0)
        batches = max(1, args.n // args.batch)

        def dataset():
            return make_dataset(files, y, None, size=args.size, batch_size=args.batch, training=True, seed=0,
                                augment=augment, cache="memory")

        it = iter(dataset())  # one iterator: pass 1 decodes and fills the cache, pass 2 reads from it
        first = rate_of(it, batches)
        cached = rate_of(it, batches)

        rows = []
        for spec in args.archs:
            arch, _, alpha = spec.partition(":")
            alpha_f = float(alpha or 1.0)
            model = build_member(arch, args.size, weights="none", alpha=alpha_f, name="bench")
            train._compile(model, Train(), 1e-3)
            xb = {"image": np.random.default_rng(0).uniform(0, 255, (args.batch, args.size, args.size, 3))
                  .astype(np.float32)}
            yb = np.zeros((args.batch, 1), np.float32)
            for _ in range(2):
                model.train_on_batch(xb, yb)  # tracing
            t2 = time.perf_counter()
            for _ in range(args.steps):
                model.train_on_batch(xb, yb)
            step = args.batch * args.steps / (time.perf_counter() - t2)
            fit_ds = dataset()
            model.fit(fit_ds, steps_per_epoch=2, epochs=1, verbose=0)  # tracing + cache start
            t3 = time.perf_counter()
            model.fit(fit_ds, steps_per_epoch=args.steps, epochs=1, verbose=0)
            fit = args.batch * args.steps / (time.perf_counter() - t3)
            rows.append({"arch": arch, "alpha": alpha_f, "params": int(model.count_params()),
                         "train_step_img_s": round(step, 1), "fit_img_s": round(fit, 1),
                         "headroom": round(cached / step, 2)})
        print(json.dumps({
            "source": source, "n": args.n, "size": args.size, "batch": args.batch, "cores": os.cpu_count(),
            "augment": augment is not None, "write_processed_s": round(prep_s, 2),
            "pipeline_first_img_s": round(first, 1),
            "pipeline_cached_img_s": round(cached, 1), "models": rows,
        }, indent=2))


if __name__ == "__main__":
    main()
