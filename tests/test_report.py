"""eval/report.py: runs of one config on disjoint seeds merge into one row; anything else stays apart."""
from __future__ import annotations

import pytest

from eval.report import merge_runs, table


def run(seeds, successes, n=50, cache="bac", n_bubble=5, p50=50.0):
    return {"task": "square", "checkpoint": "checkpoints/square", "scheduler": "ddpm", "num_inference_steps": 100,
            "cache": cache, "cache_stats": {"schedule": {"n_updates": 10, "n_bubble": n_bubble, "metric": "cosine"}},
            "loop": "offline", "n_episodes": n, "n_successes": successes, "success_rate": successes / n,
            "success_ci95": [0.0, 1.0], "seeds": list(seeds), "latency_ms": {"p50": p50, "p95": p50 * 2},
            "inference_hz": 1000 / p50, "control_hz": 50.0, "flops_ratio": 0.17, "device": "cpu", "_path": str(seeds)}


def test_disjoint_seed_ranges_merge_into_one_row():
    rows = merge_runs([run((0, 49), 20, p50=40.0), run((50, 99), 21, p50=60.0)])
    assert len(rows) == 1
    r = rows[0]
    assert (r["n_episodes"], r["n_successes"], r["success_rate"]) == (100, 41, 0.41)
    assert r["success_ci95"] == pytest.approx([0.3187, 0.5080], abs=1e-4)  # Wilson on 41/100
    assert r["latency_ms"]["p50"] == 50.0 and r["seeds"] == [[0, 49], [50, 99]]
    assert "| square | bac | 10 | 5 | 100 | 0.41 [0.32, 0.51] |" in table(rows)


def test_overlapping_seeds_or_other_knobs_stay_apart():
    assert len(merge_runs([run((0, 49), 20), run((25, 74), 21)])) == 2  # the same episodes twice
    assert len(merge_runs([run((0, 49), 20), run((50, 99), 25, n_bubble=1)])) == 2
    assert len(merge_runs([run((0, 49), 20), run((50, 99), 25, cache="uniform")])) == 2
    teacache = [dict(run(seeds, 20, cache="teacache"), cache_stats={}, cache_config={"name": "teacache", "delta": d})
                for seeds, d in (((0, 49), 0.4), ((50, 99), 0.8))]
    assert len(merge_runs(teacache)) == 2  # knobs outside any schedule count too
    retrained = dict(run((50, 99), 25), model_hash="b")  # the same folder, other weights
    assert len(merge_runs([dict(run((0, 49), 20), model_hash="a"), retrained])) == 2


def test_load_skips_and_names_files_it_cannot_use(tmp_path, capsys):
    import json

    from eval.report import load

    good = run((0, 49), 20)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "summary.json").write_text(json.dumps({k: v for k, v in good.items() if k != "_path"}))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "summary.json").write_text("")  # a crash left it empty
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "summary.json").write_text(json.dumps({"task": "lift", "ticks": 40, "stopped": None}))  # deploy
    rows = load([tmp_path])
    assert len(rows) == 1 and rows[0]["_path"] == str(tmp_path / "a")
    err = capsys.readouterr().err
    assert f"skipping {tmp_path / 'b' / 'summary.json'}: unreadable" in err
    assert f"skipping {tmp_path / 'c' / 'summary.json'}: not a rollout summary" in err
    with pytest.raises(FileNotFoundError, match="no summary.json"):
        load([tmp_path / "b"])


def test_write_out_replaces_only_its_section(tmp_path):
    from eval.report import write_out

    doc = tmp_path / "results.md"
    doc.write_text("# Results\n\nprose before\n<!-- bench:start -->\nold table\n<!-- bench:end -->\n\nprose after\n")
    write_out(doc, "\n| new | table |\n", "bench")
    assert doc.read_text() == ("# Results\n\nprose before\n<!-- bench:start -->\n| new | table |\n<!-- bench:end -->"
                               "\n\nprose after\n")
    with pytest.raises(ValueError, match="must hold one '<!-- realtime:start -->'.* it holds 0 and 0"):
        write_out(doc, "| x |", "realtime")
    write_out(tmp_path / "new.md", "| whole |\n")  # no section: the whole file
    assert (tmp_path / "new.md").read_text() == "| whole |\n"


def test_bench_table_names_each_run(tmp_path):
    import json

    from eval.report import bench_table

    row = {"config": "none", "latency_ms": {"p50": 300.0, "p95": 330.0}, "speedup": 1.0, "flops_ratio": 1.0,
           "speedup_vs_flops": 1.0, "action_mse": 0.0, "device": "cpu"}
    for sub in ("can", "can/bench_quiet"):
        (tmp_path / sub).mkdir(parents=True, exist_ok=True)
        (tmp_path / sub / "bench.json").write_text(json.dumps({"meta": {"task": "can"}, "rows": [row]}))
    lines = bench_table([tmp_path]).splitlines()
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| can", "| can/bench_quiet"]


def test_docs_tables_are_what_report_writes(tmp_path, monkeypatch):
    """The eval/report.py commands that docs/*.md list, run again, leave those docs unchanged: every table between
    the markers is what the runs under docs/ give."""
    import shlex
    from pathlib import Path

    from eval.report import main
    from tests.test_readme import DOC_COMMANDS

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    commands = [shlex.split(c)[2:] for c in DOC_COMMANDS if c.startswith("python eval/report.py")]
    assert len(commands) >= 5
    for argv in commands:
        out = argv.index("--out") + 1
        doc = root / argv[out]
        copy = tmp_path / doc.name
        if not copy.exists():
            copy.write_text(doc.read_text())
        argv[out] = str(copy)
        if "--plot" in argv:  # the figure is not compared
            i = argv.index("--plot")
            del argv[i:i + 2]
        main(argv)
    for copy in tmp_path.iterdir():
        assert copy.read_text() == (root / "docs" / copy.name).read_text(), f"docs/{copy.name} differs from report.py's"
