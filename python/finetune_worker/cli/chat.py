"""``finetune-worker chat PATH``: talk to a model or a fine-tuned run in the terminal.

PATH is a model directory, a peft adapter directory, or a training run's ``output_dir`` (its
adapter or full model; a run that has not finished yet answers from its latest complete
checkpoint). The model is loaded as the evaluate and generate jobs load it
(:func:`~finetune_worker.evaluation.loading.load_for_inference`): the adapter applied on its base,
the run's tokenizer and chat template (ChatML when the tokenizer has none, as training does).
Answers stream token by token through the same streamer the generate job uses, so what is shown
is exactly the completion, cut at stop strings, control characters made visible.

In a terminal it is a small REPL (line editing through ``readline``): ``/reset``, ``/system
TEXT``, ``/exit``; Ctrl-C stops an answer, Ctrl-C or Ctrl-D at the prompt quits. With stdin not a
terminal, every line read is one user turn and each answer is printed on stdout followed by a
newline, so ``printf 'hi\\n' | finetune-worker chat run/`` scripts it. Everything but the answers
(loading, notices, token rates) goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

#: Exit statuses, as ``run`` uses them.
EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_CANCELLED = 0, 1, 2, 130

HELP = "/reset clears the conversation, /system TEXT sets the system prompt, /exit quits"


def add_parser(sub: Any) -> None:
    chat = sub.add_parser(
        "chat",
        help="talk to a model or a fine-tuned run in this terminal",
        description="Chat with a model directory, an adapter, or a training run's output_dir "
        "(the adapter applied, the run's chat template used, answers streamed).",
        epilog="examples:\n"
        "  finetune-worker chat runs/tiny-lora                     the run's adapter on its base model\n"
        "  finetune-worker chat base/ --adapter runs/x/checkpoint-40\n"
        "  printf 'Hello\\n' | finetune-worker chat runs/tiny-lora --temperature 0   one answer on stdout\n\n"
        f"in the chat: {HELP}; Ctrl-C stops an answer",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    chat.add_argument("path", help="model directory, adapter directory, or a training run's output_dir")
    chat.add_argument("--adapter", help="peft adapter to apply on PATH (when PATH is the base model)")
    chat.add_argument("--system", help="system prompt")
    chat.add_argument("--max-new-tokens", type=int, default=256, help="most tokens per answer (256)")
    chat.add_argument("--temperature", type=float, default=0.7, help="0 answers greedily (0.7)")
    chat.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (0.9)")
    chat.add_argument("--repetition-penalty", type=float, default=1.0, help="above 1 discourages repeats")
    chat.add_argument("--seed", type=int, default=0, help="sampling seed of the first answer")
    chat.add_argument(
        "--chat-template",
        help='a template name ("chatml") or Jinja text, instead of the tokenizer\'s own',
    )
    chat.add_argument(
        "--plain",
        action="store_true",
        help="no chat template and no history: each line is a text prompt the model continues "
        "(for base models that were never taught to chat)",
    )
    chat.add_argument("--verbose", action="store_true", help="let third-party warnings print")


class ChatError(Exception):
    """A problem with PATH or the arguments, reported in one line before anything loads."""


def model_and_adapter(path: str, adapter: str | None) -> tuple[str, str | None, str | None]:
    """(model_path, adapter_path, notice) for PATH, which may be a run without final weights."""
    from finetune_worker.training.checkpoints import latest_checkpoint

    target = Path(path).expanduser()
    if not target.is_dir():
        raise ChatError(f"{path}: no such directory")
    if (target / "config.json").is_file() or (target / "adapter_config.json").is_file():
        return str(target), adapter, None
    latest = latest_checkpoint(target)
    if latest is None:
        raise ChatError(
            f"{path} holds no model (config.json), adapter (adapter_config.json) or complete checkpoint"
        )
    return str(latest), adapter, f"{path} has no final weights yet: answering from {latest.name}"


@dataclass
class Conversation:
    """The turns so far, as the prompt the next answer continues, kept inside the context."""

    tokenizer: Any
    context: int  # prompt tokens + new tokens the model can attend over
    max_new_tokens: int
    system: str | None = None
    plain: bool = False
    turns: list[dict[str, str]] = field(default_factory=list)
    _asked: list[dict[str, str]] | None = None  # the turns of the question being answered

    def prompt(self, text: str) -> tuple[list[int], int]:
        """Token ids that ask for the answer to ``text``, and how many earlier exchanges are
        dropped to fit; raises ChatError when ``text`` alone does not fit. Nothing changes until
        :meth:`answered` (a failed or interrupted answer leaves the conversation as it was)."""
        from finetune_worker.evaluation.generation import prompt_ids

        budget = self.context - self.max_new_tokens
        if self.plain:
            ids = prompt_ids(self.tokenizer, text)
            if len(ids) > budget:
                raise ChatError(self._too_long(len(ids), budget))
            return ids, 0
        turns = [*self.turns, {"role": "user", "content": text}]
        dropped = 0
        while True:
            ids = prompt_ids(self.tokenizer, turns, self.system)
            if len(ids) <= budget:
                break
            if len(turns) <= 1:
                raise ChatError(self._too_long(len(ids), budget))
            turns = turns[2:]  # the oldest question and its answer
            dropped += 1
        self._asked = turns
        return ids, dropped

    def answered(self, text: str) -> None:
        """The answer to the last :meth:`prompt`: it and its question join the conversation."""
        if not self.plain and self._asked is not None:
            self.turns = [*self._asked, {"role": "assistant", "content": text}]
        self._asked = None

    def reset(self) -> None:
        self.turns = []

    def _too_long(self, tokens: int, budget: int) -> str:
        return (
            f"that message makes a prompt of {tokens} tokens; the model's context of {self.context} "
            f"leaves {budget} for it with --max-new-tokens {self.max_new_tokens}"
        )


def context_length(model: Any, tokenizer: Any) -> int:
    config = getattr(model, "config", None)
    limits = [getattr(config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    known = [n for n in limits if isinstance(n, int) and 0 < n < 10_000_000]  # tokenizers say 1e30
    return min(known) if known else 4096


def cmd_chat(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    from pydantic import ValidationError

    from finetune_worker.config.generation import Sampling
    from finetune_worker.errors import JobFailed

    out = out or sys.stdout
    err = err or sys.stderr
    try:
        sampling = Sampling(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            repetition_penalty=args.repetition_penalty,
            seed=args.seed,
        )
        model_path, adapter_path, notice = model_and_adapter(args.path, args.adapter)
    except ValidationError as exc:
        first = exc.errors()[0]
        print(f"error: --{str(first['loc'][0]).replace('_', '-')}: {first['msg']}", file=err)
        return EXIT_INVALID
    except ChatError as exc:
        print(f"error: {exc}", file=err)
        return EXIT_INVALID
    if notice:
        print(notice, file=err)
    if not args.verbose:
        from finetune_worker.cli.quiet import capture_third_parties

        capture_third_parties()
    print(f"loading {model_path}{f' + {adapter_path}' if adapter_path else ''} ...", file=err, flush=True)
    try:
        lm, template = _load(model_path, adapter_path, args, err)
    except JobFailed as exc:
        print(f"error: {exc.message}" + (f"\n  {exc.hint}" if exc.hint else ""), file=err)
        return (
            EXIT_INVALID
            if exc.error in ("model_not_found", "invalid_config", "unsupported_model", "adapter_mismatch")
            else EXIT_FAILED
        )
    except KeyboardInterrupt:
        print(file=err)
        return EXIT_CANCELLED
    interactive = sys.stdin.isatty()
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="replace")  # bytes that are not UTF-8 must not end the chat
    conversation = Conversation(
        lm.tokenizer,
        context_length(lm.model, lm.tokenizer),
        args.max_new_tokens,
        system=args.system,
        plain=args.plain,
    )
    mode = "plain text, no history" if args.plain else f"chat template: {template}"
    print(f"{lm.description}; {mode}", file=err)
    if interactive:
        print(f"{HELP}; Ctrl-C stops an answer, Ctrl-D quits", file=err)
        with contextlib.suppress(ImportError):  # Windows has none
            import readline  # noqa: F401  (line editing and history for input())
    session = _Session(lm, conversation, sampling, interactive, out, err)
    while True:
        try:
            line = input("you> ") if interactive else sys.stdin.readline()
        except (EOFError, KeyboardInterrupt):
            if interactive:
                print(file=err)
            return EXIT_OK
        if not interactive and not line:
            return EXIT_OK  # end of input
        try:
            if not session.handle(line.rstrip("\n")):
                return EXIT_OK
        except KeyboardInterrupt:  # outside an answer (tokenizing, printing): back to the prompt
            print(file=err)
        except BrokenPipeError:  # `chat ... | head`: the reader has gone
            return EXIT_OK
        except Exception as exc:  # a template that rejects the turns, out of memory: say so, go on
            print(f"(no answer: {type(exc).__name__}: {str(exc)[:500]})", file=err)


def _load(
    model_path: str, adapter_path: str | None, args: argparse.Namespace, err: TextIO
) -> tuple[Any, str]:
    from finetune_worker.config.evaluate import ModelSource
    from finetune_worker.evaluation.loading import load_for_inference
    from finetune_worker.hf import ensure_chat_template

    src = ModelSource(model_path=model_path, adapter_path=adapter_path)
    lm = load_for_inference(
        src, lambda message: print(f"warning: {message}", file=err), model_key="PATH", adapter_key="--adapter"
    )
    own = getattr(lm.tokenizer, "chat_template", None)
    ensure_chat_template(lm.tokenizer, args.chat_template)
    if args.chat_template:
        template = "--chat-template"
    elif own:
        template = "the tokenizer's own"
    else:
        template = "ChatML (the tokenizer has none; training uses it too)"
    return lm, template


COMMANDS = ("/exit", "/quit", "/reset", "/system", "/help")


@dataclass
class _Session:
    lm: Any
    conversation: Conversation
    sampling: Any
    interactive: bool
    out: TextIO
    err: TextIO
    answers: int = 0

    def handle(self, text: str) -> bool:
        """One line the user typed; False when it asks to quit."""
        if not text.strip():
            return True
        command, _, rest = text.partition(" ")
        if command in COMMANDS:
            return self._command(command, rest.strip())
        if self.interactive and command.startswith("/") and command[1:].isalpha():
            print(
                f"unknown command {command}: {HELP} (start with a space to send it as a message)",
                file=self.err,
            )
            return True
        self.answer(text)
        return True

    def _command(self, command: str, rest: str) -> bool:
        if command in ("/exit", "/quit"):
            return False
        if command == "/help":
            print(HELP, file=self.err)
        elif command == "/reset":
            self.conversation.reset()
            print("(conversation cleared)", file=self.err)
        else:
            self.conversation.reset()
            self.conversation.system = rest or None
            print(f"(system prompt {'set' if rest else 'removed'}; conversation cleared)", file=self.err)
        return True

    def answer(self, text: str) -> None:
        from finetune_worker.cli.render import shown_text
        from finetune_worker.evaluation.generation import generate

        try:
            ids, dropped = self.conversation.prompt(text)
        except ChatError as exc:
            print(f"({exc})", file=self.err)
            return
        if dropped:
            print(f"({dropped} earlier exchange(s) dropped to fit the context)", file=self.err)
        # Each answer samples afresh; the same session replays the same answers.
        sampling = self.sampling.model_copy(update={"seed": self.sampling.seed + self.answers})
        self.answers += 1
        if self.interactive:
            self.out.write("assistant> ")
            self.out.flush()

        def on_text(row: int, piece: str) -> None:
            self.out.write(shown_text(piece))
            self.out.flush()

        stop = threading.Event()  # Ctrl-C: the streamer's stopping criterion sees it at the next token
        previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
        started = time.monotonic()
        try:
            completion = generate(
                self.lm.model, self.lm.tokenizer, [ids], sampling, on_text=on_text, cancel=stop
            )[0]
        finally:
            signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
        seconds = time.monotonic() - started
        self.out.write("\n")
        self.out.flush()
        self.conversation.answered(completion.text)
        if self.interactive:
            reason = (
                "stopped by Ctrl-C"
                if stop.is_set()
                else {"eos": "end of turn", "stop": "stop string"}.get(
                    completion.finish_reason, f"--max-new-tokens {sampling.max_new_tokens} reached"
                )
            )
            rate = completion.tokens / seconds if seconds > 0 else 0.0
            print(f"  ({completion.tokens} tokens, {rate:.1f} tokens/s, {reason})", file=self.err)
