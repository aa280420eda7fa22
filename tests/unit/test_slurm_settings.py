"""The Slurm section's pure logic: parsing, sbatch's options, Slurm's durations and
job records, the doctor's reading of gres strings."""

from __future__ import annotations

import shlex

import pytest

from ssh_provisioner import ProvisionerConfigError
from ssh_provisioner.doctor import _gpus_in
from ssh_provisioner.slurm import JobInfo, SlurmSettings, parse_duration


def test_the_issue_example_parses_to_sbatch_options() -> None:
    settings = SlurmSettings.parse(
        {
            "partition": "gpu", "gpus": 1, "cpus_per_task": 4, "mem": "16G",
            "time": "02:00:00", "account": "proj123", "qos": None, "constraint": None,
            "reservation": None, "job_name": "jupyter-{kernel_id}",
            "extra_directives": ["--exclusive", "#SBATCH --mail-type=END"],
            "prologue": ["module load cuda/12", "source ~/venvs/ml/bin/activate"],
        }
    )  # fmt: skip
    argv = settings.sbatch_argv("k1")
    assert argv[:2] == ["sbatch", "--parsable"]
    for option in ["--job-name=jupyter-k1", "--partition=gpu", "--cpus-per-task=4",
                   "--mem=16G", "--time=02:00:00", "--account=proj123", "--gres=gpu:1",
                   "--exclusive", "--mail-type=END", "--no-requeue"]:  # fmt: skip
        assert option in argv
    assert not any(a.startswith(("--qos", "--constraint", "--reservation")) for a in argv)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"partiton": "gpu"}, r"'partiton' \(did you mean 'partition'\?\)"),
        ({"gpus": "two"}, r"'gpus': expected a GPU count or TYPE:COUNT"),
        ({"cpus_per_task": 0}, r"'cpus_per_task': expected a positive integer"),
        ({"prologue": [1]}, r"'prologue': expected a list of strings"),
        ({"queue_timeout": -1}, r"'queue_timeout': expected a positive number"),
        ({"job_name": "jupyter-{user}"}, r"'job_name'.*may use only \{kernel_id\}"),
    ],
)
def test_bad_values_are_named(config: dict[str, object], message: str) -> None:
    with pytest.raises(ProvisionerConfigError, match=message):
        SlurmSettings.parse(config)


def test_typed_gpus_and_a_single_prologue_line() -> None:
    settings = SlurmSettings.parse({"gpus": "a100:2", "prologue": "module load cuda"})
    assert "--gres=gpu:a100:2" in settings.sbatch_argv("k")
    assert settings.prologue == ("module load cuda",)


def test_the_step_command_carries_no_secret_and_ends_srun_on_the_marker() -> None:
    command = SlurmSettings.parse({"cpus_per_task": 2}).step_command("42", "python3", 600)
    script = shlex.split(command)[-1]
    assert "srun --jobid=42 --overlap --ntasks=1 --nodes=1 --quiet --cpus-per-task=2" in script
    assert '[ "$pp" = "$s" ] && kill -KILL "$p"; done; kill -KILL $s' in script
    assert "key" not in script.lower()


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("02:00:00", 7200), ("1-00:00:00", 86400), ("10:30", 630), ("5", 300),
     ("2-03", 2 * 86400 + 3 * 3600), ("UNLIMITED", None), ("NOT_SET", None)],
)  # fmt: skip
def test_slurm_durations(text: str, seconds: float | None) -> None:
    assert parse_duration(text) == seconds


def test_a_job_record_read_from_scontrol() -> None:
    record = (
        "JobId=7 JobName=jupyter-k UserId=ada(1000) JobState=RUNNING Reason=None "
        "RunTime=00:10:00 TimeLimit=01:00:00 NodeList=node2 BatchHost=node2"
    )
    info = JobInfo.from_scontrol(record)
    assert info.running
    assert info.nodes == "node2"
    assert info.time_left == 3000
    pending = JobInfo.from_scontrol("JobId=8 JobState=PENDING Reason=Resources NodeList=(null)")
    assert pending.waiting
    assert pending.describe() == "PENDING (Resources)"
    assert not pending.nodes
    assert JobInfo.from_scontrol("JobId=9 JobState=TIMEOUT Reason=TimeLimit").ended


@pytest.mark.parametrize(
    ("gres", "kind", "count"),
    [("gpu:2", "", 2), ("gpu:a100:4(S:0-1),shard:8", "", 4), ("gpu:a100:4", "v100", 0),
     ("(null)", "", 0), ("gpu:a100:4(S:0),gpu:v100:2", "v100", 2)],
)  # fmt: skip
def test_gpus_read_from_gres(gres: str, kind: str, count: int) -> None:
    assert _gpus_in(gres, kind) == count
