"""``ibkit chat MODEL_DIR``: ask a model about an image in the terminal (reads stdin, so it can be scripted)."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TextIO

from ibkit.app.assistant import Assistant, ModelSource, parse_value

HELP = """commands:
  /image PATH        load an image (the questions that follow are about it)
  /settings          show the generation settings
  /set KEY VALUE     change one (e.g. /set num_beams 3, /set max_new_tokens 20, /set prompt "Q: {question} A:");
                     /set KEY none removes a generation argument
  /help              this text
  /quit              leave (end of input does too)
any other line is a question about the current image"""


EMPTY_ANSWER = "(empty answer: the model generated only special tokens)"


def format_settings(settings: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in settings.items())


class ChatSession:
    """The terminal session's state: the assistant and the current image."""

    def __init__(self, assistant: Assistant, out: TextIO = sys.stdout) -> None:
        self.assistant, self.out = assistant, out
        self.image: Any = None
        self.image_path: str | None = None

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def load_image(self, path: str) -> None:
        from ibkit.data.transforms import BadInputError, load_image

        try:
            self.image = load_image(path)
        except BadInputError as error:
            self.say(f"cannot load the image: {error}")
            return
        self.image_path = path
        self.say(f"image: {path} ({self.image.width}x{self.image.height})")

    def handle(self, line: str) -> bool:
        """Act on one input line; False when the session ends."""
        line = line.strip()
        if not line:
            return True
        command, _, rest = line.partition(" ")
        if command in ("/quit", "/exit"):
            return False
        if command == "/help":
            self.say(HELP)
        elif command == "/image":
            self.load_image(rest.strip()) if rest.strip() else self.say("usage: /image PATH")
        elif command == "/settings":
            self.say(format_settings(self.assistant.settings()))
        elif command == "/set":
            key, _, value = rest.strip().partition(" ")
            if not key or not value.strip():
                self.say("usage: /set KEY VALUE")
                return True
            try:
                self.assistant.set(key, parse_value(value.strip()))
            except ValueError as error:
                self.say(f"cannot set {key}: {error}")
                return True
            self.say(format_settings(self.assistant.settings()))
        elif command.startswith("/"):
            self.say(f"unknown command {command}; /help lists them")
        elif self.image is None:
            self.say("no image yet: /image PATH first")
        else:
            try:
                answer = self.assistant.ask([self.image], [line])[0]
            except (TypeError, ValueError) as error:  # a generation setting the model refuses
                self.say(f"error: {error}")
                return True
            self.say(answer or EMPTY_ANSWER)
        return True

    def run(self, lines: Iterable[str], prompt: str = "") -> None:
        for line in lines:
            if not self.handle(line):
                break
            if prompt:
                print(prompt, end="", file=self.out, flush=True)


def chat(
    model: str,
    checkpoint: str | None = None,
    image: str | None = None,
    generation: dict[str, Any] | None = None,
    llm_dtype: str | None = None,
    device: str | None = None,
) -> int:
    """Ask a model about images in the terminal: /image PATH, then questions; /help lists the commands.

    Args:
        model: the model folder (e.g. outputs/demo/instruct/model).
        checkpoint: an ``ibkit fit`` checkpoint whose trained weights go over the folder.
        image: an image to start with.
        generation: generation settings over the default (5 beams, up to 256 new tokens), e.g. '{num_beams: 1}'.
        llm_dtype: dtype of the LLM (e.g. bfloat16 on a GPU).
        device: cuda or cpu (default: cuda when available).
    """
    assistant = Assistant.load(ModelSource(model, checkpoint, llm_dtype, device), generation)
    session = ChatSession(assistant)
    interactive = sys.stdin.isatty()
    session.say(f"ibkit chat: {model}  (/help for commands)")
    session.say(format_settings(assistant.settings()))
    if image:
        session.load_image(image)
    if interactive:
        print("> ", end="", flush=True)
    session.run(sys.stdin, prompt="> " if interactive else "")
    return 0
