"""CIRCO and GeneCIS: the real annotation files are read, counted and scored as their official code does."""
import json
import warnings

import numpy as np
import pytest

from spn4cir.benchmarks import load_genecis, validate_circo, validate_genecis
from spn4cir.core import SpnError, read_json, write_json
from spn4cir.evaluate import ScoreConfig, score_predictions

def test_validate_counts_the_real_circo_annotations_without_images(benchmark_data):
    report = validate_circo(benchmark_data("circo"))
    assert report["val"]["all"]["queries"] == 220 and report["test"]["all"]["queries"] == 800
    assert report["val"]["all"]["ground_truths"] == sum(len(a["gt_img_ids"]) for a in read_json(benchmark_data("circo") / "annotations/val.json"))
    assert report["val"]["all"]["gallery"] == "absent" and report["val"]["all"]["images"] == report["val"]["all"]["missing_images"]

def test_validate_counts_the_real_genecis_templates_and_lists_missing_tasks(benchmark_data):
    report = validate_genecis(benchmark_data("genecis"))
    assert set(report["val"]) == {"focus_object", "change_object"}
    assert report["missing_tasks"] == ["focus_attribute", "change_attribute"]
    for task in report["val"].values(): assert (task["queries"], task["distractors"], task["discarded"]) == (1960, 14, 0)

def test_official_example_submission_scores_through_the_score_job(benchmark_data, tmp_path):
    root = benchmark_data("circo")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = score_predictions(ScoreConfig("circo", str(root), str(root / "submission_examples/submission_val.json"), out=str(tmp_path / "m.json")))
    assert any("gallery index is absent" in str(w.message) for w in caught)
    assert set(metrics) == {"mAP@5", "mAP@10", "mAP@25", "mAP@50", "R@5", "R@10", "R@25", "R@50", "aspects"}
    assert read_json(tmp_path / "m.json") == metrics and read_json(tmp_path / "m.settings.json")["format"] == "circo"
    print({k: round(v, 2) for k, v in metrics.items() if k != "aspects"})

def test_score_refuses_bad_circo_files_naming_the_query(benchmark_data, tmp_path):
    root = benchmark_data("circo")
    preds = read_json(root / "submission_examples/submission_val.json")
    def score(change):
        bad = json.loads(json.dumps(preds)); change(bad); write_json(tmp_path / "p.json", bad)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return score_predictions(ScoreConfig("circo", str(root), str(tmp_path / "p.json")))
    with pytest.raises(SpnError, match="no ranking for query id 3"): score(lambda d: d.pop("3"))
    with pytest.raises(SpnError, match="record 5: the ranking names"): score(lambda d: d["5"].__setitem__(1, d["5"][0]))
    with pytest.raises(SpnError, match="query id 999 is not in the split"): score(lambda d: d.__setitem__("999", []))
    with pytest.raises(SpnError, match="record 0: the ranking has 10 ids, at least 50"): score(lambda d: d.__setitem__("0", d["0"][:10]))
    with pytest.raises(SpnError, match="no ground truths"): score_predictions(ScoreConfig("circo", str(root), str(tmp_path / "p.json"), split="test"))

def test_genecis_rankings_score_per_task_and_refuse_strangers(benchmark_data, tmp_path):
    root = benchmark_data("genecis")
    task = load_genecis(root, "focus_object")
    rng = np.random.default_rng(0)
    ranked = {str(t.index): [t.candidates[j].name for j in rng.permutation(len(t.candidates))] for t in task.templates}
    write_json(tmp_path / "focus_object_ranks.json", ranked)
    got = score_predictions(ScoreConfig("genecis", str(root), str(tmp_path / "focus_object_ranks.json")))["focus_object"]
    expected = {f"R@{k}": 100 * np.mean([r[str(t.index)].index(t.target.name) < k for t in task.templates for r in [ranked]]) for k in (1, 2, 3)}
    assert got == pytest.approx(expected)
    assert 100 / 15 - 3 < got["R@1"] < 100 / 15 + 3                     # a random ranking is at chance level (1 in 15)
    ranked["0"][0] = "12345678"; write_json(tmp_path / "focus_object_ranks.json", ranked)
    with pytest.raises(SpnError, match="record 0: '12345678' is not a candidate"):
        score_predictions(ScoreConfig("genecis", str(root), str(tmp_path / "focus_object_ranks.json")))
    with pytest.raises(SpnError, match="names no GeneCIS task"): score_predictions(ScoreConfig("genecis", str(root), str(tmp_path / "x.json")))

def test_real_genecis_change_object_keeps_a_target_that_is_also_a_distractor(benchmark_data):
    t = load_genecis(benchmark_data("genecis"), "change_object").templates[19]
    names = [c.name for c in t.candidates]
    assert names.count(names[0]) == 2
