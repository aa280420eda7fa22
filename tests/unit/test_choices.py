"""The check of a user's choice against a kernelspec's user_options (choices.py)."""

from __future__ import annotations

import pytest

from ssh_provisioner.choices import UserOptions, from_env
from ssh_provisioner.errors import OptionRefused, ProvisionerConfigError

DECLARED = {
    "gpus": {"min": 0, "max": 4, "default": 1},
    "partition": {"choices": ["gpu", "debug"]},
    "time": {"max": "8:00:00", "default": "1:00:00"},
    "mem": {"min": "1G", "max": "64G"},
    "host": {},
}
WHERE = "kernelspec 'GPU'"


def options() -> UserOptions:
    return UserOptions.parse(DECLARED, ["gpu1", "gpu2"])


def test_defaults_fill_what_was_not_chosen() -> None:
    assert options().resolve({}, WHERE) == {"gpus": 1, "partition": "gpu", "time": "1:00:00"}


def test_a_choice_within_bounds_is_taken_in_its_kinds_form() -> None:
    chosen = {"gpus": "2", "partition": "debug", "time": "2-00:00:00", "mem": "16G", "host": "gpu2"}
    with pytest.raises(
        OptionRefused, match=r"Time limit \(time\): '2-00:00:00' is outside -8:00:00"
    ):
        options().resolve(chosen, WHERE)
    chosen["time"] = "7:30:00"
    assert options().resolve(chosen, WHERE) == {
        "gpus": 2, "partition": "debug", "time": "7:30:00", "mem": "16G", "host": "gpu2"
    }  # fmt: skip


@pytest.mark.parametrize(
    ("chosen", "said"),
    [
        ({"gpus": 5}, r"GPUs \(gpus\): 5 is outside 0-4"),
        ({"gpus": -1}, "expected a whole number"),
        ({"gpus": True}, "expected a whole number"),
        ({"partition": "long"}, "'long' is not one of gpu, debug"),
        ({"mem": "512M"}, "is outside 1G-64G"),
        ({"mem": "lots"}, "expected a size"),
        ({"host": "elsewhere"}, "'elsewhere' is not one of gpu1, gpu2"),
        ({"qos": "high"}, "qos cannot be chosen here"),
    ],
)
def test_a_value_outside_the_bounds_is_refused_naming_them(chosen: dict, said: str) -> None:
    with pytest.raises(OptionRefused, match=said) as refused:
        options().resolve(chosen, WHERE)
    assert str(refused.value).startswith(WHERE)


def test_the_host_is_left_to_the_policy_unless_chosen() -> None:
    assert "host" not in options().resolve({}, WHERE)


def test_mistakes_in_the_declaration_are_config_errors() -> None:
    for declared, said in (
        ({"colour": {}}, "may be one of"),
        ({"gpus": {"max": "many"}}, "its bound or default"),
        ({"gpus": {"max": 2, "default": 3}}, "its bound or default"),
        ({"partition": {}}, "give 'choices'"),
        ({"gpus": {"maximum": 2}}, "unknown key"),
    ):
        with pytest.raises(ProvisionerConfigError, match=said):
            UserOptions.parse(declared)


def test_the_environment_chooses_as_kernel_ssh_variables() -> None:
    env = {"KERNEL_SSH_GPUS": "3", "KERNEL_SSH_HOST": "gpu1", "KERNEL_SSH_QOS": "x"}
    # only what is declared; KERNEL_SSH_HOST pins a host on placement's terms
    assert from_env(env, options()) == {"gpus": "3"}
