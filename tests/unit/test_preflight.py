"""pipeline.preflight and pipeline.errors: the cluster arithmetic, the run directory, and one line
out of a Ray error that wraps a user error (no Ray started: Ray's exception classes are plain).

    PYTHONPATH=. python -m pytest tests/unit/test_preflight.py -q
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.data import DataError
from pipeline.errors import UserError, find_user_error
from pipeline.preflight import PreflightError, check_run_dir, demand, shortfall

REPO = Path(__file__).resolve().parents[2]
TWO_CPUS = {"CPU": 2.0}


def naive_cpus(cfg) -> float:
    """What every actor of a CPU run reserves, summed by hand."""
    r, t = cfg.rollout, cfg.train
    return (r.num_generators * r.num_cpus + t.num_workers * t.cpus_per_worker
            + cfg.selector.num_cpus + cfg.reward.num_cpus)


def test_the_tiny_config_fits_two_cpus_exactly_up_to_two_generators():
    assert shortfall(load_config([]), TWO_CPUS) is None
    cfg = load_config(["rollout.num_generators=2"])
    assert naive_cpus(cfg) == 2.0 and shortfall(cfg, TWO_CPUS) is None   # exact fit is a fit
    assert sum(a for _, a, _ in demand(cfg)["CPU"]) == naive_cpus(cfg)


def test_eight_generators_on_two_cpus_is_one_line_naming_the_keys():
    why = shortfall(load_config(["rollout.num_generators=8"]), TWO_CPUS, local=True)
    assert why == ("preflight: the run needs 5 CPU (generators 8 x rollout.num_cpus=0.5 = 4, learner 1 x "
                   "train.cpus_per_worker=0.5 = 0.5, selector.num_cpus=0.25, reward.num_cpus=0.25) but the Ray "
                   "cluster has 2; change rollout.num_generators, rollout.num_cpus, train.num_workers, "
                   "train.cpus_per_worker, selector.num_cpus, reward.num_cpus or raise ray.num_cpus")


def test_four_learner_workers_alone_do_not_fit():
    why = shortfall(load_config(["train.num_workers=4"]), TWO_CPUS)
    assert why.startswith("preflight: the run needs 3 CPU") and "learner 4 x train.cpus_per_worker=0.5 = 2" in why
    assert "ray.num_cpus" not in why   # an attached cluster: its size is not ours to change


def test_gpus_asked_of_a_cpu_machine():
    why = shortfall(load_config(["rollout.num_gpus=1"]), TWO_CPUS)
    assert why == ("preflight: the run needs 1 GPU (generators 1 x rollout.num_gpus=1 = 1) but the Ray cluster "
                   "has 0; change rollout.num_generators, rollout.num_gpus")
    assert "GPU" in shortfall(load_config(["train.use_gpu=true"]), TWO_CPUS)


def test_tensor_parallel_generators_reserve_a_gpu_and_a_cpu_per_shard():
    cfg = load_config(["conf=qwen7b"])
    r, t = cfg.rollout, cfg.train
    tp = r.vllm.tensor_parallel_size
    gpus = (r.num_generators * (tp if tp > 1 else r.num_gpus)) + t.num_workers * t.gpus_per_worker * t.use_gpu
    assert sum(a for _, a, _ in demand(cfg)["GPU"]) == gpus
    plenty = {"CPU": 1000.0, "GPU": float(gpus)}
    assert shortfall(cfg, plenty) is None
    assert "GPU" in shortfall(cfg, {**plenty, "GPU": gpus - 1.0})


def test_run_dir_that_is_a_file_or_under_a_file(tmp_path):
    a_file = tmp_path / "f"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match=rf"^run.dir: {a_file} exists and is not a directory; choose another run.dir$"):
        check_run_dir(load_config([f"run.dir={a_file}"]))
    with pytest.raises(ConfigError, match=r"^run.dir: cannot write to the run directory .*/f/run \(Not a directory\)"):
        check_run_dir(load_config([f"run.dir={a_file}/run"]))
    assert check_run_dir(load_config([f"run.dir={tmp_path}/new/run"])).is_dir()


def test_read_only_run_dir():
    # Root ignores mode bits, so a read-only place that binds root too: sysfs refuses new files.
    if os.access("/sys/kernel", os.W_OK) and not Path("/sys/kernel").exists():
        pytest.skip("no /sys/kernel here")
    with pytest.raises(ConfigError, match=r"^run.dir: cannot write to the run directory /sys/kernel \("):
        check_run_dir(load_config(["run.dir=/sys/kernel"]))


def test_user_errors_share_one_class():
    assert all(issubclass(c, UserError) for c in (ConfigError, DataError, PreflightError))


def test_a_user_error_inside_a_ray_task_error_unwraps_to_its_line():
    from ray.exceptions import RayTaskError
    wrapped = RayTaskError("Rewarder.run", "Traceback ...\nDataError: x", DataError("data.train: no rows"))
    assert find_user_error(wrapped) == "data.train: no rows"
    assert find_user_error(wrapped.as_instanceof_cause()) == "data.train: no rows"
    try:   # the driver re-raises a stage's failure `from` it
        raise RuntimeError("the learner failed") from wrapped
    except RuntimeError as e:
        assert find_user_error(e) == "data.train: no rows"


def test_a_user_error_in_an_actor_constructor_is_found_in_its_traceback_text():
    from ray.exceptions import ActorDiedError, RayTaskError
    tb = ('Traceback (most recent call last):\n  File "actors/selector.py", line 30, in __init__\n'
          "pipeline.data.DataError: data.train: no usable row: of 3 rows, 3 had no answer\n")
    died = ActorDiedError(RayTaskError("PromptSelector.__init__", tb, RuntimeError("lost")))
    assert find_user_error(died) == "data.train: no usable row: of 3 rows, 3 had no answer"


def test_a_user_error_on_a_train_worker_unwraps():
    from ray.train import WorkerGroupError
    err = WorkerGroupError("rank 0 failed", {0: ConfigError("train.lr: must be > 0")})
    assert find_user_error(err) == "train.lr: must be > 0"


def test_our_bugs_are_not_user_errors():
    from ray.exceptions import RayTaskError
    assert find_user_error(KeyError("x")) is None
    assert find_user_error(RayTaskError("f", "Traceback ...\nKeyError: 'x'", KeyError("x"))) is None


def test_preflight_arithmetic_does_not_import_ray():
    code = ("import sys; from pipeline.config import load_config; from pipeline.preflight import shortfall; "
            "shortfall(load_config([]), {'CPU': 2}); print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.strip() == "False"
