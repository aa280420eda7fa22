"""Keyboard-interactive rules: parsing (the CLI's short form too) and answering."""

from __future__ import annotations

import pytest

from ssh_provisioner import ProvisionerConfigError
from ssh_provisioner.kbdint import PromptAnswering, PromptRule, parse_rules


def test_short_forms_and_dicts() -> None:
    fixed, command = parse_rules(["Passcode or option=1", "Verification code=!pass otp 'my box'"])
    assert (fixed.prompt, fixed.answer, fixed.command) == ("Passcode or option", "1", None)
    assert command.command == ("pass", "otp", "my box")
    assert command.as_config() == {
        "prompt": "Verification code",
        "command": ["pass", "otp", "my box"],
    }
    assert PromptRule.parse(fixed.as_config()) == fixed
    assert "1" not in repr(fixed)  # an answer stays out of reprs (and so of logs)


@pytest.mark.parametrize(
    ("rule", "says"),
    [
        ("no equals sign", "REGEX=ANSWER"),
        ("=x", "REGEX=ANSWER"),
        ({"prompt": "(", "answer": "x"}, "regex"),
        ({"prompt": "p"}, "exactly one"),
        ({"prompt": "p", "answer": "x", "command": ["y"]}, "exactly one"),
        ({"prompt": "p", "answr": "x"}, "'prompt'"),
        ({"prompt": "p", "command": []}, "argv"),
    ],
)
def test_bad_rules_are_config_errors(rule: object, says: str) -> None:
    with pytest.raises(ProvisionerConfigError, match=says):
        parse_rules([rule])


async def test_answers_by_rule_and_notices_a_refusal() -> None:
    client = PromptAnswering("h", parse_rules(["Password=secret", "Code=!echo 123456"]))
    assert await client.kbdint_challenge_received("", "", "", []) == []
    answers = await client.kbdint_challenge_received(
        "", "", "", [("Password: ", False), ("Code: ", False)]
    )
    assert answers == ["secret", "123456"]
    assert await client.kbdint_challenge_received("", "", "", [("Code: ", False)]) is None
    error = client.explain("h")
    assert error is not None
    assert "'Code: '" in str(error)
    assert "123456" not in str(error)


async def test_a_failing_command_is_named_by_its_prompt() -> None:
    client = PromptAnswering("h", parse_rules(["Code=!false"]))
    assert await client.kbdint_challenge_received("", "", "", [("Code: ", False)]) is None
    assert "exit status 1" in str(client.explain("h"))
