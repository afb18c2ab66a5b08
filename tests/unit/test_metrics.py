"""metrics.jsonl: whole rows only, never overwritten, and continued exactly after a checkpoint."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.metrics import MetricsError, MetricsLog

ROOT = Path(__file__).resolve().parents[2]


def step_row(step: int) -> dict:
    return {"step": step, "train/loss": 0.5, "rollout/samples": 10 * step, "rollout/probe_samples": step}


def rows(path: Path) -> list[dict]:
    text = path.read_text()
    assert text == "" or text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_rows_carry_cumulative_counters(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLog(path) as log:
        log.write({"step": 0, "eval/accuracy": 0.3})      # no train/loss: no cumulative keys
        for s in (1, 2, 3):
            log.write(step_row(s))
    got = rows(path)
    assert "rollout/total_samples" not in got[0]
    assert [r["rollout/total_samples"] for r in got[1:]] == [10, 30, 60]
    assert [r["rollout/total_probe_samples"] for r in got[1:]] == [1, 3, 6]
    assert log.last_step == 3


def test_a_fresh_log_never_overwrites_an_existing_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLog(path) as log:
        for s in range(5):
            log.write(step_row(s))
    before = path.read_bytes()
    with pytest.raises(MetricsError, match="already holds a run's metrics") as e:
        MetricsLog(path).__enter__()
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert path.read_bytes() == before
    empty = tmp_path / "empty.jsonl"
    empty.touch()
    with MetricsLog(empty) as log:                        # an empty file holds nothing to lose
        log.write(step_row(1))
    assert len(rows(empty)) == 1


def test_resume_drops_rows_past_the_checkpoint_and_a_half_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLog(path) as log:
        log.write({"step": 0, "eval/accuracy": 0.3})
        for s in range(1, 7):
            log.write(step_row(s))
    with open(path, "a") as f:
        f.write('{"step": 7, "train/lo')                  # a crash mid-row (an older writer)
    with MetricsLog(path, resume_after_step=4) as log:
        assert (log.last_step, log.dropped) == (4, 3)      # steps 5, 6 and the half row 7
        assert (log.total_samples, log.total_probe_samples) == (100, 10)
        for s in (5, 6, 7, 8):
            log.write(step_row(s))
    got = rows(path)
    assert [r["step"] for r in got] == list(range(9))      # every step exactly once
    fresh = tmp_path / "fresh.jsonl"                       # the same steps written without a crash
    with MetricsLog(fresh) as log:
        log.write({"step": 0, "eval/accuracy": 0.3})
        for s in range(1, 9):
            log.write(step_row(s))
    assert got == rows(fresh)                              # counters continue exactly


def test_resume_keeps_a_clean_file_as_it_is_and_accepts_a_missing_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLog(path) as log:
        for s in range(4):
            log.write(step_row(s))
    inode = path.stat().st_ino
    with MetricsLog(path, resume_after_step=3) as log:
        assert log.dropped == 0 and log.last_step == 3
    assert path.stat().st_ino == inode                     # nothing to drop: not rewritten
    with MetricsLog(tmp_path / "none.jsonl", resume_after_step=3) as log:
        assert log.last_step is None and log.total_samples == 0   # the caller decides what that means


def test_resume_refuses_a_broken_row_mid_file_with_one_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\nnot json\n{"step": 1}\n')
    with pytest.raises(MetricsError, match=r"metrics.jsonl:2: not a metrics row") as e:
        MetricsLog(path, resume_after_step=1).__enter__()
    assert "\n" not in str(e.value)
    assert path.read_text() == '{"step": 0}\nnot json\n{"step": 1}\n'   # left for the user to fix


# A child process fills a file system (or its own file-size limit) with rows until a write
# fails, then checks the file it leaves: every line whole, exactly the rows that succeeded.
CHILD = textwrap.dedent("""
    import json, resource, signal, sys
    from pathlib import Path
    from pipeline.metrics import MetricsError, MetricsLog
    path, limit = Path(sys.argv[1]), int(sys.argv[2])
    if limit:   # RLIMIT_FSIZE: a write past it gets EFBIG (with SIGXFSZ ignored), after a partial write
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    written, error = 0, None
    with MetricsLog(path) as log:
        for step in range(10_000):
            try:
                log.write({"step": step, "train/loss": 0.5, "rollout/samples": 8, "pad": "x" * 700})
            except MetricsError as e:
                error = str(e)
                break
            written += 1
        data = path.read_bytes()
        lines = data.split(b"\\n")
        whole = lines[-1] == b"" and all(json.loads(l)["step"] == i for i, l in enumerate(lines[:-1]))
    print(json.dumps({"written": written, "rows": len(lines) - 1, "whole": whole, "error": error,
                      "total": log.total_samples}))
""")


def _check_child(out: str, path: str) -> None:
    got = json.loads(out.strip().splitlines()[-1])
    assert got["error"] is not None and got["written"] > 0
    assert "disk full" in got["error"] and path in got["error"] and "\n" not in got["error"]
    assert got["whole"] and got["rows"] == got["written"]          # no half row at the end
    assert got["total"] == 8 * got["written"]                      # the failed row was not counted


def test_file_size_limit_leaves_only_whole_rows(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    out = subprocess.run([sys.executable, "-c", CHILD, path, "10000"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    _check_child(out.stdout, path)


def test_full_disk_leaves_only_whole_rows(tmp_path):
    """A real full file system: a 16 KiB tmpfs mounted in a private mount namespace."""
    if not shutil.which("unshare") or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("needs unshare -rm (user + mount namespaces) to mount a small tmpfs")
    mnt = tmp_path / "small"
    mnt.mkdir()
    path = str(mnt / "metrics.jsonl")
    script = (f"mount -t tmpfs -o size=16k none {mnt} && "
              f"exec {sys.executable} -c \"$CHILD\" {path} 0")
    out = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "CHILD": CHILD})
    if out.returncode and "mount" in out.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip()}")
    assert out.returncode == 0, out.stderr
    _check_child(out.stdout, path)
