"""pipeline.report: the offline HTML page links only real PNGs, skips nulls and fails clearly."""
import json
import math
import re

import pytest

from pipeline.report import build_report, main, run_labels
from pipeline.runlog import lag_counts, moving_average, read_rows, series, summary

PROMISED = {"reward", "eval", "zero_variance", "selector", "rollouts", "time", "staleness"}


def fake_rows(steps: int, *, greso: bool, new_keys: bool) -> list[dict]:
    """metrics.jsonl rows shaped like run.py's: an eval-only step 0, then one row per learner step."""
    rows, total = [{"step": 0, "policy_version": 0, "eval/accuracy": 0.3, "eval/prompts": 64}], 0
    for s in range(1, steps + 1):
        samples = 256 + 8 * (s % 5)
        total += samples
        r = {"step": s, "reward/mean": s / steps, "rollout/samples": samples, "rollout/total_samples": total,
             "rollout/easy_ratio": 0.01 * (s % 7), "rollout/hard_ratio": 0.3 - 0.005 * s,
             "selector/skipped_easy": s % 3 if greso else 0, "selector/skipped_hard": 1 if greso else 0,
             "selector/p_easy": 0.5 if greso else 1.0, "selector/p_hard": 0.4 if greso else 1.0,
             "time/generate": 0.2, "time/train": 0.3, "time/wait_learner": 0.01, "time/weight_publish": 0.02,
             "time/step": 0.4, "staleness/mean": s % 2, "staleness/max": 1,
             "ledger/issued": 40 * s, "ledger/trained": 32 * s, "ledger/filtered": 6 * s, "ledger/dropped_stale": 2 * s}
        if new_keys:   # the keys being added: sometimes null, like the pipeline writes before a probe
            r.update({"selector/false_skip_rate": None if s % 4 else 0.1, "rollout/difficulty_mean": 0.5,
                      "train/difficulty_mean": None, "rollout/probe_samples": None,
                      f"staleness/groups_{s % 2}": 32, "eval/gsm8k/avg@4": None})
        if s % 10 == 0:
            r.update({"eval/accuracy": 0.3 + s / 100, "eval/gsm8k/accuracy": 0.2 + s / 100, "eval/prompts": 64})
        rows.append(r)
    return rows


def write_run(path, rows, selector):
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "config.yaml").write_text(f"run:\n  name: fake\n  seed: 0\nselector:\n  name: {selector}\n")
    return path


@pytest.fixture
def two_runs(tmp_path):
    return [write_run(tmp_path / "none-0", fake_rows(30, greso=False, new_keys=False), "none"),
            write_run(tmp_path / "greso-0", fake_rows(30, greso=True, new_keys=True), "greso")]


def img_sources(page: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', page)


def test_report_links_only_existing_pngs(two_runs, tmp_path):
    out = build_report(two_runs, tmp_path / "cmp")
    page = out.read_text()
    srcs = img_sources(page)
    assert len(srcs) >= 6 and {s.removeprefix("report_").removesuffix(".png") for s in srcs} >= PROMISED
    for src in srcs:
        png = out.parent / src
        assert "/" not in src and png.stat().st_size > 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "report_false_skip.png" in srcs and "report_difficulty.png" in srcs   # greso run has them
    assert "fake · none" in page and "fake · greso" in page and "http" not in page


def test_plots_without_data_are_omitted_with_a_note(two_runs, tmp_path):
    (tmp_path / "cmp" / "report_false_skip.png").parent.mkdir()
    (tmp_path / "cmp" / "report_false_skip.png").write_bytes(b"stale")
    page = build_report(two_runs[:1], tmp_path / "cmp").read_text()   # the run without the new keys
    assert "report_false_skip.png" not in img_sources(page) and "Omitted" in page
    assert not (tmp_path / "cmp" / "report_false_skip.png").exists()


def test_cli_defaults_to_first_run_dir(two_runs, capsys):
    main([str(d) for d in two_runs])
    assert (two_runs[0] / "report.html").is_file() and "report.html" in capsys.readouterr().out


def test_missing_metrics_errors_clearly(two_runs, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no metrics.jsonl"):
        build_report([two_runs[0], tmp_path / "empty"], tmp_path / "out")
    assert not (tmp_path / "out").exists()   # checked before anything is written


def test_partial_last_line_is_dropped_but_corrupt_middle_is_not(tmp_path):
    run = write_run(tmp_path / "r", fake_rows(3, greso=False, new_keys=False), "none")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "rew')             # killed mid-write
    assert [r["step"] for r in read_rows(run)] == [0, 1, 2, 3]
    (run / "metrics.jsonl").write_text('{"step": 0}\n[1, 2]\n{"step": 1}\n')
    with pytest.raises(SystemExit, match=":2: not a JSON object"):
        read_rows(run)


def test_series_skips_null_nan_and_missing_and_starts_rollouts_at_zero():
    rows = [{"step": 0, "eval/accuracy": 0.1}, {"step": 1, "x": None, "rollout/total_samples": 8},
            {"step": 2, "x": math.nan, "rollout/total_samples": 16}, {"step": 3, "x": 2.0},
            {"step": 4, "x": 3, "rollout/total_samples": 24, "eval/accuracy": 0.5}]
    assert series(rows, "x") == ([3, 4], [2.0, 3])
    assert series(rows, "eval/accuracy", "rollout/total_samples") == ([0, 24], [0.1, 0.5])


def test_a_step_without_rollouts_has_no_reward_but_does_count_zero_rollouts():
    rows = [{"step": 1, "rollout/groups": 4, "rollout/samples": 32, "reward/mean": 0.5},
            {"step": 2, "rollout/groups": 0, "rollout/samples": 0, "reward/mean": 0.0}]
    assert series(rows, "reward/mean") == ([1], [0.5]) and series(rows, "rollout/samples") == ([1, 2], [32, 0])


def test_moving_average_matches_a_naive_centred_window():
    ys = [1.0, 5.0, 2.0, 8.0, 3.0, 3.0, 9.0]
    for w in (1, 2, 3, 4, 20):
        naive = []
        for i in range(len(ys)):
            lo = i - w // 2                  # np.convolve 'same' puts the extra point of an even window left
            part = ys[max(lo, 0):min(lo + w, len(ys))]
            naive.append(sum(part) / len(part))
        assert moving_average(ys, w) == pytest.approx(naive)


def test_summary_and_lag_counts():
    rows = fake_rows(30, greso=True, new_keys=True)
    s = summary(rows)
    assert s["steps"] == 30 and s["final accuracy"] == pytest.approx(0.6) and s["final gsm8k/accuracy"] == 0.5
    assert s["final gsm8k/avg@4"] is None and s["ledger/trained"] == 960
    assert s["rollouts"] == rows[-1]["rollout/total_samples"] and s["wall s (sum time/step)"] == pytest.approx(12)
    assert lag_counts(rows) == {0: 15 * 32, 1: 15 * 32}


def test_labels_fall_back_to_dir_names_when_config_names_clash(tmp_path):
    dirs = [tmp_path / "a", tmp_path / "b"]
    cfg = {"run": {"name": "tiny"}, "selector": {"name": "greso"}}
    assert run_labels(dirs, [cfg, {**cfg, "selector": {"name": "none"}}]) == ["tiny · greso", "tiny · none"]
    assert run_labels(dirs, [cfg, cfg]) == ["a", "b"] and run_labels(dirs, [{}, cfg]) == ["a", "tiny · greso"]
