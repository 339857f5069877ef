"""Model cards (tasks/core/card.py): what a card must show, built from plain dicts; no MLflow, no model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tasks.core import card as C
from tasks.core.metrics import calibration_table, score, subgroup_table


def _index() -> pd.DataFrame:
    rows = []
    for i in range(60):
        split = ["train", "val", "test"][i % 3]
        rows.append({"source": "clinic-a" if i % 4 else "clinic-b", "isic_id": f"ISIC_{i:07d}", "split": split,
                     "target": int(i % 5 == 0), "source_dataset": "HAM10000" if i % 2 else "ISIC 2020",
                     "augmented_from": None, "synthetic": False})
    rows += [{"source": "clinic-a", "isic_id": f"ISIC_9{i:06d}", "split": "train", "target": 1,
              "source_dataset": "HAM10000", "augmented_from": "ISIC_0000000", "synthetic": False} for i in range(5)]
    rows += [{"source": "cyclegan", "isic_id": f"GAN_{i}", "split": "train", "target": 1, "source_dataset": None,
              "augmented_from": None, "synthetic": True} for i in range(3)]
    return pd.DataFrame(rows)


def _inputs(n: int = 200, groups: int = 3) -> dict:
    rng = np.random.default_rng(0)
    y = (rng.random(n) < 0.3).astype(int)
    p = np.clip(y * 0.4 + rng.random(n) * 0.6, 0, 1)
    metrics = score(p, y, threshold=0.45, n_bootstrap=200)
    frame = pd.DataFrame({"source": np.where(np.arange(n) % 2, "clinic-a", "clinic-b"),
                          "sex": rng.choice(["male", "female", "unknown"], n),
                          "site": rng.choice([f"site{k}" for k in range(groups)], n)})
    table = subgroup_table(frame, p, y, 0.45)
    config = {"image_size": 128, "tta": 2, "threshold": 0.45, "target_sensitivity": 0.9, "metadata": {"age": 1},
              "members": [{"name": "m0", "arch": "efficientnet_b0", "weights": "imagenet", "metadata": True}]}
    return C.card_inputs(model_name="lesionflow-classifier", version="7", run_id="abc123", metrics=metrics,
                         subgroups=table, model_config=config, index=_index(),
                         calibration=calibration_table(p, y, 10),
                         op_ci=C.operating_point_ci(p, y, 0.45, n_bootstrap=300),
                         lineage={"data_hash": "d41d8cd98f00b204e9800998ecf8427e.dir", "data_hash_source": "dvc.lock",
                                  "data_out": "data/upsample", "git_commit": "0123456789abcdef", "git_dirty": False},
                         created="2025-01-01 00:00:00 UTC")


def test_card_shows_lineage_metrics_subgroups_calibration_limits_and_use() -> None:
    inputs = _inputs()
    md = C.build_card(inputs)
    assert md.startswith("# Model card: lesionflow-classifier v7")
    for needle in ("## Intended use", "not a diagnosis", "## Data lineage", "d41d8cd98f00b204e9800998ecf8427e.dir",
                   "0123456789abcdef", "## Test metrics", "ROC AUC", "## Calibration", "Expected calibration error",
                   "## Subgroups", "## Known limits", "efficientnet_b0", "threshold 0.4500"):
        assert needle in md, needle
    m = inputs["metrics"]
    assert f"{m['auc']:.3f} (CI {m['auc_ci_low']:.3f}–{m['auc_ci_high']:.3f})" in md
    sens_lo, sens_hi = inputs["op_ci"]["sensitivity"]
    assert f"(CI {sens_lo:.3f}–{sens_hi:.3f})" in md and sens_lo <= m["at_operating_point"]["sensitivity"] <= sens_hi
    # counts per source, split and class (real images), generated rows apart
    assert "| clinic-a | train | 12 | 3 | 5 |" in md and "| cyclegan | train | 0 | 0 | 3 |" in md
    assert "| HAM10000 |" in md and "| ISIC 2020 |" in md
    # every subgroup row of the table is in the card
    for r in inputs["subgroups"]:
        assert f"| {r['kind']} | {r['group']} | {r['n']} |" in md
    assert "8 of" in md and "generated" in md  # generated training rows are a stated limit
    # sections in order; subgroups last (what a too-long description loses first)
    heads = [line for line in md.splitlines() if line.startswith("## ")]
    assert heads[0] == "## Intended use" and heads[-1].startswith("## Subgroups")


def test_known_limits_flag_small_and_weak_groups_and_single_source() -> None:
    inputs = _inputs()
    inputs["subgroups"] = [{"kind": "sex", "group": "male", "n": 100, "n_malignant": 30, "auc": 0.5},
                           {"kind": "site", "group": "palms", "n": 4, "n_malignant": 1, "auc": 1.0},
                           {"kind": "sex", "group": "unknown", "n": 90, "n_malignant": 20, "auc": 0.9}]
    inputs["metrics"]["auc"] = 0.9
    inputs["data"]["by_source_split"] = [{"source": "only", "split": "train", "benign": 5, "malignant": 5,
                                          "real": 10, "generated": 0}]
    limits = "\n".join(C.known_limits(inputs))
    assert "sex=male (AUC 0.500" in limits and "site=palms" in limits and "one source (only)" in limits
    assert "Metadata missing" in limits and "sex (90/200)" in limits


def test_operating_point_ci_brackets_the_point_and_is_deterministic() -> None:
    rng = np.random.default_rng(1)
    y = (rng.random(300) < 0.4).astype(int)
    p = np.clip(0.3 * y + 0.6 * rng.random(300), 0, 1)
    a = C.operating_point_ci(p, y, 0.5, n_bootstrap=500, seed=3)
    assert a == C.operating_point_ci(p, y, 0.5, n_bootstrap=500, seed=3)
    sens = ((p >= 0.5) & (y == 1)).sum() / y.sum()
    lo, hi = a["sensitivity"]
    assert lo < sens < hi and 0 <= lo and hi <= 1
    assert C.operating_point_ci(p, y, 0.5, n_bootstrap=0) == {}
    assert C.operating_point_ci(np.r_[0.1, 0.2], np.r_[0, 0], 0.5, n_bootstrap=10)["sensitivity"] == [None, None]


@pytest.mark.parametrize("groups", [3, 400])
def test_description_fits_the_registry_field(groups: int) -> None:
    inputs = _inputs(n=2000, groups=groups)
    md = C.build_card(inputs)
    desc = C.card_description(md, "abc123")
    assert len(desc) <= C.DESCRIPTION_LIMIT
    if len(md) <= C.DESCRIPTION_LIMIT:
        assert desc == md
    else:  # cut in the subgroup table, on a line boundary, with a pointer to the full card
        assert "## Known limits" in desc and "lesionflow card runs:/abc123" in desc
        assert desc.split("\n\n…")[0].splitlines()[-1].endswith("|")


def test_card_inputs_are_plain_json() -> None:
    import json

    inputs = _inputs()
    text = json.dumps(inputs)  # no numpy scalars / NaN left
    assert "NaN" not in text and json.loads(text)["version"] == "7"
