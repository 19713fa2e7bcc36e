"""The demo's closing reading follows its own numbers (fixed rows here; no demo run)."""

from jobs.demo_reading import read_against_paper

BUDGET = {"tokens": 76_800, "active_params": 262_720}  # the demo's default: 150 steps x 8 x 64 tokens


def rows(dense: float, *moe: float, key: str = "paloma_macro_ce") -> list[dict]:
    out = [{"name": "mini_dense", "kind": "dense", key: dense, **BUDGET}]
    out += [{"name": f"mini_moe{i}", "kind": "moe", key: loss, **BUDGET} for i, loss in enumerate(moe)]
    return out


def test_dense_ahead_is_read_as_what_the_paper_expects():
    text = read_against_paper(rows(4.50, 4.53, 4.56))
    assert "**Dense wins**" in text and "mini_moe0, is 0.0300 behind" in text
    assert "what the paper expects at this compute" in text and "not that MoE is broken" in text
    # the budget sentence from the numbers: 76,800 / 262,720 = 0.29 tokens per parameter = 0.015x Chinchilla
    assert "76,800 tokens: 0.29 per active parameter" in text and "0.015x a Chinchilla-like budget" in text
    assert "| mini_moe1 | 4.5600 | +0.0600 |" in text


def test_moe_ahead_is_flagged_as_against_the_papers_expectation():
    text = read_against_paper(rows(4.50, 4.53, 4.47))
    assert "**MoE wins** (mini_moe1: held-out macro CE 4.4700, 0.0300 ahead of dense)" in text
    assert "would expect dense ahead" in text and "Dense wins" not in text


def test_small_gap_is_a_tie():
    text = read_against_paper(rows(4.500, 4.505, 4.52))
    assert "**A tie**" in text and "(+0.0050)" in text


def test_falls_back_to_the_metric_every_point_has():
    data = rows(3.0, 3.2, key="train_loss")
    data[1]["paloma_macro_ce"] = 2.0  # only one point was evaluated: not a common metric
    text = read_against_paper(data)
    assert "| point | train loss (last-50-step mean) | vs dense |" in text and "**Dense wins**" in text


def test_missing_numbers_say_so_instead_of_a_verdict():
    data = rows(4.5, 4.6)
    data[1]["paloma_macro_ce"] = float("nan")
    text = read_against_paper(data)
    assert text.startswith("No reading against the paper") and "wins" not in text
    assert read_against_paper(rows(4.5)).startswith("No reading against the paper")
