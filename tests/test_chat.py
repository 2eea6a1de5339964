"""``finetune-worker chat``: a fine-tuned run answers in a real terminal (tmux) and piped, with its
adapter applied and its chat template, the conversation carried from turn to turn. The expected
answers are computed here independently, with plain transformers + peft."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from cli_helpers import TMUX, Terminal, run_cli
from finetune_worker.cli.render import shown_text
from test_train_helpers import run_job, tiny_config

QUESTIONS = ["What is the capital of France?", "And of Spain?"]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished LoRA run (adapter, tokenizer and chat template in its output_dir)."""
    out = tmp_path_factory.mktemp("chat") / "run"
    cfg = tiny_config(
        tiny_model_dir,
        out,
        training_parameters={"epochs": 1, "batch_size": 8, "learning_rate": 1e-2, "logging_steps": 4},
        checkpoint={"every_steps": 6, "keep": 2},
    )
    done = run_job(cfg, timeout=600).terminal
    assert done.type == "completed", done.payload
    return out


def expected_answers(
    model_dir: Path, questions: list[str], adapter: Path | None, template_from: Path
) -> list[str]:
    """Greedy answers, each question asked after the previous question and answer."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(template_from))
    model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    turns: list[dict[str, str]] = []
    answers = []
    for question in questions:
        turns.append({"role": "user", "content": question})
        ids = tok.apply_chat_template(
            turns, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.inference_mode():
            generated = model.generate(
                **ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id
            )
        new = generated[0, ids["input_ids"].shape[1] :].tolist()
        if tok.eos_token_id in new:
            new = new[: new.index(tok.eos_token_id)]
        answer = tok.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        answers.append(answer)
        turns.append({"role": "assistant", "content": answer})
    return answers


GREEDY = ("--temperature", "0", "--max-new-tokens", str(NEW_TOKENS))


def test_piped_chat_answers_with_the_adapter_and_keeps_the_conversation(
    run_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    tuned = expected_answers(tiny_model_dir, QUESTIONS, run_dir, run_dir)
    base = expected_answers(tiny_model_dir, QUESTIONS[:1], None, run_dir)
    assert tuned[0] != base[0]  # else the test could not tell whether the adapter was applied

    done = run_cli("chat", str(run_dir), *GREEDY, cwd=tmp_path, input="\n".join(QUESTIONS) + "\n")
    assert done.returncode == 0, done.stderr
    # stdout is the answers only, one after the other; the second one saw the first exchange.
    assert done.stdout == "".join(shown_text(a) + "\n" for a in tuned), (done.stdout, tuned)
    assert "+ adapter run on cpu" in done.stderr and "chat template: the tokenizer's own" in done.stderr

    # /reset forgets the first exchange: the second question is then asked on its own.
    alone = expected_answers(tiny_model_dir, QUESTIONS[1:], run_dir, run_dir)
    reset = run_cli(
        "chat", str(run_dir), *GREEDY, cwd=tmp_path, input=f"{QUESTIONS[0]}\n/reset\n{QUESTIONS[1]}\n"
    )
    assert reset.returncode == 0, reset.stderr
    assert reset.stdout == shown_text(tuned[0]) + "\n" + shown_text(alone[0]) + "\n"
    assert "(conversation cleared)" in reset.stderr


def test_a_run_without_final_weights_answers_from_its_latest_checkpoint(
    run_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    partial = tmp_path / "interrupted"
    partial.mkdir()
    for step in (6, 12):
        shutil.copytree(run_dir / f"checkpoint-{step}", partial / f"checkpoint-{step}")
    from finetune_worker.outputs import INCOMPLETE_SENTINEL

    (partial / "checkpoint-12" / INCOMPLETE_SENTINEL).touch()  # a save cut short: not a choice
    done = run_cli("chat", str(partial), *GREEDY, cwd=tmp_path, input=QUESTIONS[0] + "\n")
    assert done.returncode == 0, done.stderr
    assert f"{partial} has no final weights yet: answering from checkpoint-6" in done.stderr
    want = expected_answers(tiny_model_dir, QUESTIONS[:1], partial / "checkpoint-6", run_dir)
    assert done.stdout == shown_text(want[0]) + "\n"


def test_bad_paths_and_flags_are_one_clear_line(run_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text('{"model_type": "nonsense"}')
    cases = [
        ((str(tmp_path / "missing"),), f"error: {tmp_path / 'missing'}: no such directory"),
        (
            (str(tmp_path / "empty"),),
            "holds no model (config.json), adapter (adapter_config.json) or complete checkpoint",
        ),
        (
            (str(tmp_path / "odd"),),
            "error: PATH '" + str(tmp_path / "odd") + "': model_type 'nonsense' is not",
        ),
        (
            (str(run_dir), "--adapter", str(tmp_path / "empty")),
            "error: PATH '" + str(run_dir) + "' is an adapter and --adapter names another one",
        ),
        ((str(run_dir), "--top-p", "2"), "error: --top-p: Input should be less than or equal to 1"),
        ((str(run_dir), "--max-new-tokens", "0"), "error: --max-new-tokens: Input should be greater than 0"),
    ]
    for args, message in cases:
        done = run_cli("chat", *args, cwd=tmp_path, input="")
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr


def test_a_template_that_fails_is_reported_and_the_chat_goes_on(run_dir: Path, tmp_path: Path) -> None:
    template = "{{ raise_exception('this template takes no user turns') }}"
    done = run_cli(
        "chat", str(run_dir), *GREEDY, "--chat-template", template, cwd=tmp_path, input="hello\nagain\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("(no answer: TemplateError: this template takes no user turns)") == 2, (
        done.stderr
    )
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_a_long_conversation_drops_its_oldest_exchanges(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    from finetune_worker.cli.chat import ChatError, Conversation
    from finetune_worker.hf import ensure_chat_template

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    ensure_chat_template(tok, None)
    chat = Conversation(tok, context=120, max_new_tokens=40, system="Be brief.")
    for i in range(6):
        ids, dropped = chat.prompt(f"question number {i} about the weather in town")
        assert len(ids) <= 80
        chat.answered(f"answer number {i}, it is sunny today")
    assert dropped > 0 and chat.turns[0]["content"].startswith("question number")
    before = list(chat.turns)
    chat.prompt("a question whose answer never comes (Ctrl-C, an error)")
    assert chat.turns == before  # only an answer adds the exchange
    assert chat.turns[-1]["content"] == "answer number 5, it is sunny today"
    assert tok.decode(ids).count("Be brief.") == 1  # the system prompt is never dropped
    with pytest.raises(ChatError, match="leaves 80 for it with --max-new-tokens 40"):
        chat.prompt("word " * 200)
    assert chat.turns[-1]["content"] == "answer number 5, it is sunny today"  # nothing lost


@pytest.mark.skipif(TMUX is None, reason="needs tmux (Debian's tmux package; CI installs it)")
def test_chat_in_a_real_terminal(run_dir: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    tuned = expected_answers(tiny_model_dir, QUESTIONS, run_dir, run_dir)
    with Terminal(f"fw-chat-{tmp_path.name}", "chat", str(run_dir), *GREEDY, cwd=tmp_path) as term:
        term.wait_for("you> ")
        term.send(QUESTIONS[0], "Enter")
        screen = term.wait_for(lambda s: s.count("you> ") == 2)
        assert f"assistant> {shown_text(tuned[0])}".rstrip() in screen.splitlines(), screen
        assert "tokens/s, end of turn)" in screen or "reached)" in screen, screen
        term.send(QUESTIONS[1], "Enter")
        screen = term.wait_for(lambda s: s.count("you> ") == 3)
        assert f"assistant> {shown_text(tuned[1])}".rstrip() in screen.splitlines(), screen
        term.send("/nonsense", "Enter")
        term.wait_for("unknown command /nonsense")
        term.send("C-d")
        assert "EXITED-0" in term.wait_for("EXITED-")


@pytest.mark.skipif(TMUX is None, reason="needs tmux (Debian's tmux package; CI installs it)")
def test_ctrl_c_stops_an_answer_and_the_chat_goes_on(tiny_model_dir: Path, tmp_path: Path) -> None:
    # The base model sampled for up to 1,500 tokens: an answer long enough to interrupt.
    args = ("chat", str(tiny_model_dir), "--plain", "--temperature", "1", "--max-new-tokens", "1500")
    with Terminal(f"fw-chatc-{tmp_path.name}", *args, cwd=tmp_path) as term:
        term.wait_for("you> ")
        term.send("Once upon a time", "Enter")
        term.wait_for("assistant> ")
        term.send("C-c")
        screen = term.wait_for(lambda s: s.count("you> ") == 2, timeout=60)
        assert "stopped by Ctrl-C)" in screen, screen
        term.send("C-c")  # at the prompt: quit
        assert "EXITED-0" in term.wait_for("EXITED-")
