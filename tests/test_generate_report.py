"""eval/generate_report.py: rows from generate summaries, the Pareto front, peers against the engine, the plot."""
from __future__ import annotations

import json

import pytest

from eval import generate_report as gr


def _summary(name, speed1, speed16, psnr, acc=0.96, fd=16.0):
    return {"cache": {"name": name}, "speedup": {"1": speed1, "16": speed16}, "flops_ratio": 0.3, "psnr_db": psnr,
            "ssim": 0.99, "rel_l2": 0.05, "K": 50, "scheduler": "DDIMScheduler", "n_samples": 160, "threads": 1,
            "device": "cpu", "classifier": {"uncached": {"accuracy": 0.97, "fd": 15.6}, "fd_real_train": 5.7,
                                            "cached": {"accuracy": acc, "fd": fd},
                                            "change": {"accuracy": acc - 0.97, "accuracy_se": 0.01,
                                                       "fd": fd - 15.6, "fd_se": 0.5}}}


@pytest.fixture
def runs(tmp_path):
    rows = {"none": ("none", 1.0, 1.0, 100.0), "uniform_S10": ("uniform", 3.7, 3.3, 35.7),
            "bac_S5": ("bac", 4.5, 4.2, 31.0), "taylorseer_3": ("taylorseer", 1.6, 1.7, 47.6),
            "slow_bad": ("fora", 1.5, 1.5, 30.0, 0.90, 19.0), "diffusers_fbcache_0.1": ("diffusers_fbcache", 2.0, 2.1, 28.0),
            "fewer_steps_10": ("fewer_steps", 4.9, 4.9, 25.0)}
    for row, args in rows.items():
        (tmp_path / row).mkdir()
        (tmp_path / row / "summary.json").write_text(json.dumps(_summary(*args)))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "summary.json").write_text("{")
    return tmp_path


def test_front_table_and_peer_verdicts(runs, capsys):
    rows = gr.load([runs])
    assert "broken" in capsys.readouterr().err and len(rows) == 7
    assert gr.front(rows, 16) == {"none", "taylorseer_3", "uniform_S10", "fewer_steps_10", "bac_S5"}
    md = gr.table(rows)
    lines = {line.split(" | ")[0][2:]: line for line in md.splitlines() if line.startswith("| ")}
    assert lines["slow_bad"].endswith("| -0.070 ± 0.010 | +3.40 ± 0.50 | no |  |")
    assert lines["uniform_S10"].endswith("| -0.010 ± 0.010 | +0.40 ± 0.50 | yes | * |")
    assert "| 3.70x | 3.30x |" in lines["uniform_S10"] and "| peer |" in lines["fewer_steps_10"]
    # FBCache (28 dB) is beaten by bac_S5 (31 dB, 4.2x); fewer steps (25 dB) is faster than any engine row
    assert "diffusers_fbcache_0.1 2.10x at 28.0 dB: engine ahead (bac_S5 4.20x at 31.0 dB)" in md
    assert "fewer_steps_10 4.90x at 25.0 dB: engine behind (bac_S5 4.20x at 31.0 dB)" in md


def test_report_writes_a_section_and_a_plot(runs, tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("intro\n<!-- table:start -->\nold\n<!-- table:end -->\nafter\n")
    gr.main([str(runs), "--out", str(doc), "--section", "table", "--plot", str(tmp_path / "p.png")])
    text = doc.read_text()
    assert text.startswith("intro\n<!-- table:start -->\n| row |") and text.endswith("<!-- table:end -->\nafter\n")
    assert "old" not in text and (tmp_path / "p.png").stat().st_size > 10_000
    with pytest.raises(SystemExit, match="no generate summary"):
        gr.load([tmp_path / "empty"])
