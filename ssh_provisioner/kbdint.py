"""Keyboard-interactive prompts answered without a terminal (a second factor).

A host's ``kbdint`` rules say how to answer each prompt the server sends: a fixed answer
(Duo's "Passcode or option" -> ``1`` asks for a push) or a local command whose stdout
is the answer (a TOTP generator, a password manager's ``otp`` command).  A rule is
``{"prompt": REGEX, "answer": TEXT}`` or ``{"prompt": REGEX, "command": ARGV}``, or the
CLI's short form ``REGEX=TEXT`` / ``REGEX=!COMMAND``.

Answers are asked for once per pooled connection, never per kernel, and never appear
in a log line, an error message or a command line (a command gets no prompt text on
its argv either).  A refused answer is an AuthenticationError naming the prompt.
"""

from __future__ import annotations

import asyncio
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncssh

from .errors import AuthenticationError, ProvisionerConfigError

KBDINT = "kbdint"  # the connect-option key that carries the rules to connect()
AUTH_COOLDOWN = "auth_cooldown"  # ... and the seconds a refused host is not prompted
COMMAND_TIMEOUT = 120.0  # a push notification waits for a human


@dataclass(frozen=True)
class PromptRule:
    prompt: str
    answer: str | None = field(default=None, repr=False)
    command: tuple[str, ...] | None = None

    @classmethod
    def parse(cls, item: Any) -> PromptRule:
        if isinstance(item, str):
            pattern, sep, rest = item.partition("=")
            if not sep or not pattern:
                raise ProvisionerConfigError(
                    "kbdint: a rule is 'REGEX=ANSWER' or 'REGEX=!COMMAND' (got a text without '=')"
                )
            if rest.startswith("!"):
                item = {"prompt": pattern, "command": rest[1:]}
            else:
                item = {"prompt": pattern, "answer": rest}
        if not isinstance(item, dict) or set(item) - {"prompt", "answer", "command"}:
            raise ProvisionerConfigError(
                "kbdint: each rule is {'prompt': REGEX, 'answer': TEXT} or "
                "{'prompt': REGEX, 'command': ARGV}"
            )
        prompt = item.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise ProvisionerConfigError("kbdint: a rule needs a 'prompt' regex")
        try:
            re.compile(prompt)
        except re.error as exc:
            raise ProvisionerConfigError(f"kbdint: prompt regex {prompt!r}: {exc}") from exc
        answer, command = item.get("answer"), item.get("command")
        if (answer is None) == (command is None):
            raise ProvisionerConfigError(
                f"kbdint: the rule for {prompt!r} needs exactly one of 'answer' and 'command'"
            )
        if answer is not None:
            if not isinstance(answer, str):
                raise ProvisionerConfigError(f"kbdint: the answer for {prompt!r} is not text")
            return cls(prompt, answer=answer)
        argv = shlex.split(command) if isinstance(command, str) else command
        if (
            not isinstance(argv, list | tuple)
            or not argv
            or not all(isinstance(arg, str) for arg in argv)
        ):
            raise ProvisionerConfigError(
                f"kbdint: the command for {prompt!r} is an argv list or a command line"
            )
        return cls(prompt, command=tuple(argv))

    def matches(self, text: str) -> bool:
        return re.search(self.prompt, text) is not None

    def as_config(self) -> dict[str, Any]:
        if self.command is not None:
            return {"prompt": self.prompt, "command": list(self.command)}
        return {"prompt": self.prompt, "answer": self.answer}

    async def respond(self, host: str, text: str) -> str:
        if self.command is None:
            return self.answer or ""
        try:
            process = await asyncio.create_subprocess_exec(
                *self.command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
            )
        except OSError as exc:
            raise AuthenticationError(
                f"SSH to {host}: cannot run the kbdint command for the prompt {text!r}: "
                f"{exc.strerror or exc}",
                host=host,
            ) from exc
        try:
            stdout, _ = await asyncio.wait_for(process.communicate(), COMMAND_TIMEOUT)
        except BaseException:
            if process.returncode is None:
                process.kill()
                await process.wait()
            raise
        if process.returncode != 0:
            raise AuthenticationError(
                f"SSH to {host}: the kbdint command for the prompt {text!r} failed "
                f"(exit status {process.returncode})",
                host=host,
            )
        return stdout.decode(errors="replace").strip("\r\n")


def parse_rules(items: Any) -> list[PromptRule]:
    if items is None:
        return []
    if not isinstance(items, list | tuple):
        raise ProvisionerConfigError("kbdint: a list of rules")
    return [PromptRule.parse(item) for item in items]


class PromptAnswering(asyncssh.SSHClient):
    """Answers keyboard-interactive prompts by the rules; remembers, for the error
    message, a prompt no rule matched or whose answer was refused (asked again)."""

    def __init__(self, host: str, rules: list[PromptRule]) -> None:
        self._host = host
        self._rules = rules
        self._answered: set[str] = set()
        self.unanswered: str | None = None
        self.refused: str | None = None
        self.failure: AuthenticationError | None = None

    def kbdint_auth_requested(self) -> str | None:
        return ""  # even without rules: the prompt text makes the error clear

    async def kbdint_challenge_received(
        self, name: str, instructions: str, lang: str, prompts: Sequence[tuple[str, bool]]
    ) -> list[str] | None:
        if not prompts:
            return []
        responses = []
        for text, _echo in prompts:
            if text in self._answered:
                self.refused = text
                return None
            rule = next((rule for rule in self._rules if rule.matches(text)), None)
            if rule is None:
                self.unanswered = text
                return None
            try:
                responses.append(await rule.respond(self._host, text))
            except AuthenticationError as exc:
                self.failure = exc
                return None
        self._answered.update(text for text, _ in prompts)
        return responses

    def explain(self, host: str) -> AuthenticationError | None:
        """The refusal in terms of the prompts, or None if no prompt was involved."""
        if self.failure is not None:
            return self.failure
        if self.refused is not None:
            return AuthenticationError(
                f"SSH to {host}: the answer to the keyboard-interactive prompt "
                f"{self.refused!r} was refused (check the kbdint rule for it)",
                host=host,
                prompted=True,
            )
        if self.unanswered is not None:
            return AuthenticationError(
                f"SSH to {host}: the host asks {self.unanswered!r} (keyboard-interactive, "
                f"a second factor?) and no kbdint rule answers it: add one (kbdint, or "
                f"`ssh-provisioner install --kbdint 'REGEX=ANSWER'`)",
                host=host,
                prompted=True,
            )
        return None
