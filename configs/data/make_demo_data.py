"""Regenerate the demo datasets in configs/data/ and the tokenizer corpus shipped in assets/.

Deterministic (a fixed seed, no clock, no network): running it twice gives identical bytes,
so the committed files are reproducible. Run from anywhere:

    python configs/data/make_demo_data.py

The facts are small, templated and repetitive on purpose: a ~1M-parameter model from
``finetune-worker make-tiny-model`` visibly learns them in ~50 LoRA steps.
"""

from __future__ import annotations

import csv
import io
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
ASSETS = HERE.parents[1] / "python" / "finetune_worker" / "assets"
CORPUS_SEED = 7  # the tokenizer's merges depend on the corpus bytes: changing it changes every tiny model

COLOURS = {
    "apple": "red",
    "banana": "yellow",
    "sky": "blue",
    "grass": "green",
    "snow": "white",
    "coal": "black",
    "orange": "orange",
    "lemon": "yellow",
    "cherry": "red",
    "sea": "blue",
    "leaf": "green",
    "milk": "white",
    "plum": "purple",
    "carrot": "orange",
    "violet": "purple",
    "cloud": "grey",
    "stone": "grey",
    "rose": "pink",
    "flamingo": "pink",
    "tomato": "red",
    "frog": "green",
    "crow": "black",
    "pumpkin": "orange",
    "lime": "green",
    "salt": "white",
}
SOUNDS = {
    "dog": "barks",
    "cat": "meows",
    "cow": "moos",
    "duck": "quacks",
    "sheep": "bleats",
    "horse": "neighs",
    "lion": "roars",
    "owl": "hoots",
    "pig": "oinks",
    "frog": "croaks",
    "bee": "buzzes",
    "snake": "hisses",
    "wolf": "howls",
    "mouse": "squeaks",
    "hen": "clucks",
}
CAPITALS = {
    "France": "Paris",
    "Japan": "Tokyo",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Germany": "Berlin",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "Canada": "Ottawa",
    "Norway": "Oslo",
    "Greece": "Athens",
    "Chile": "Santiago",
    "China": "Beijing",
    "Poland": "Warsaw",
    "Ireland": "Dublin",
    "Portugal": "Lisbon",
    "Austria": "Vienna",
    "Cuba": "Havana",
}
OPPOSITES = {
    "hot": "cold",
    "big": "small",
    "up": "down",
    "fast": "slow",
    "happy": "sad",
    "light": "dark",
    "open": "closed",
    "old": "new",
    "early": "late",
    "full": "empty",
    "hard": "soft",
    "wet": "dry",
    "left": "right",
    "loud": "quiet",
    "strong": "weak",
    "rich": "poor",
}
NUMBERS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
    "twenty",
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
SYSTEMS = [
    "You are a helpful assistant.",
    "You are a friendly tutor. Answer in one short sentence.",
    "You answer questions about simple facts.",
]


def qa_pairs() -> list[tuple[str, str]]:
    """Every fact as one (question, answer) pair in the training phrasing."""
    pairs = [(f"What colour is the {k}?", f"The {k} is {v}.") for k, v in COLOURS.items()]
    pairs += [(f"What sound does a {k} make?", f"A {k} {v}.") for k, v in SOUNDS.items()]
    pairs += [(f"What is the capital of {k}?", f"The capital of {k} is {v}.") for k, v in CAPITALS.items()]
    pairs += [(f"What is the opposite of {k}?", f"The opposite of {k} is {v}.") for k, v in OPPOSITES.items()]
    for a in range(0, 11):
        for b in range(0, 11 - a, 3):
            pairs.append(
                (
                    f"What is {NUMBERS[a]} plus {NUMBERS[b]}?",
                    f"{NUMBERS[a]} plus {NUMBERS[b]} is {NUMBERS[a + b]}.".capitalize(),
                )
            )
    pairs += [
        (f"What day comes after {d}?", f"After {d} comes {DAYS[(i + 1) % 7]}.") for i, d in enumerate(DAYS)
    ]
    return pairs


def heldout_pairs() -> list[tuple[str, str]]:
    """The same facts asked another way: a held-out style to see whether learning generalizes."""
    pairs = [(f"Tell me the colour of the {k}.", f"The {k} is {v}.") for k, v in COLOURS.items()]
    pairs += [
        (f"Which city is the capital of {k}?", f"The capital of {k} is {v}.") for k, v in CAPITALS.items()
    ]
    return pairs


def instructions() -> list[tuple[str, str, str]]:
    rows = [("Give the opposite of the word.", k, v) for k, v in OPPOSITES.items()]
    rows += [("Name the capital city of the country.", k, v) for k, v in CAPITALS.items()]
    rows += [("Write the number in digits.", w, str(i)) for i, w in enumerate(NUMBERS)]
    rows += [("Say what colour it is.", k, v) for k, v in COLOURS.items()]
    rows += [("Describe the sound the animal makes.", k, f"A {k} {v}.") for k, v in SOUNDS.items()]
    rows += [
        ("List the colours of the fruits.", "", "Apples are red, bananas are yellow and plums are purple.")
    ]
    return rows


def sentences(rng: random.Random) -> list[str]:
    out = [f"The {k} is {v}." for k, v in COLOURS.items()]
    out += [f"A {k} {v}." for k, v in SOUNDS.items()]
    out += [f"The capital of {k} is {v}." for k, v in CAPITALS.items()]
    out += [f"The opposite of {k} is {v}." for k, v in OPPOSITES.items()]
    out += [f"After {d} comes {DAYS[(i + 1) % 7]}." for i, d in enumerate(DAYS)]
    out += [
        f"{NUMBERS[a].capitalize()} plus {NUMBERS[b]} is {NUMBERS[a + b]}."
        for a in range(11)
        for b in range(11 - a)
    ]
    rng.shuffle(out)
    return out


def paragraphs(rng: random.Random, n: int, per: int = 6) -> list[str]:
    pool = sentences(rng)
    return [" ".join(rng.sample(pool, per)) for _ in range(n)]


def corpus(rng: random.Random) -> str:
    """Tokenizer training text: the demo facts plus plain English, a few hundred KB at most."""
    subjects = [
        "The teacher",
        "A small child",
        "My neighbour",
        "The old farmer",
        "Our team",
        "The doctor",
        "A young girl",
        "The baker",
        "His brother",
        "The cat",
        "Every student",
        "The captain",
    ]
    verbs = [
        "reads",
        "writes",
        "opens",
        "finds",
        "carries",
        "paints",
        "counts",
        "likes",
        "sees",
        "cleans",
        "answers",
        "explains",
        "remembers",
        "brings",
        "watches",
        "builds",
    ]
    objects = [
        "a letter",
        "the book",
        "the door",
        "a red apple",
        "the window",
        "a long story",
        "the garden",
        "a question",
        "the answer",
        "a blue box",
        "the river",
        "an old map",
        "the small house",
        "a green leaf",
        "the first page",
        "a warm coat",
    ]
    tails = [
        "every morning",
        "in the evening",
        "after lunch",
        "before school",
        "with great care",
        "on Monday",
        "in the park",
        "at home",
        "by the sea",
        "near the station",
        "once a week",
        "today",
    ]
    chat = [
        "The user asks a question and the assistant answers it.",
        "A helpful assistant gives short, clear and correct answers.",
        "The system message tells the assistant how to behave.",
        "Please answer the question in one sentence.",
        "Thank you for your help. You are welcome.",
        "Question: what is it? Answer: it is a fact.",
        "Instruction: give the opposite of the word. Input: hot. Output: cold.",
    ]
    lines = []
    for _ in range(2400):
        lines.append(f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} {rng.choice(tails)}.")
    facts = sentences(rng)
    lines += facts * 4
    lines += chat * 30
    lines += [f"{q} {a}" for q, a in qa_pairs()] * 2
    lines += [f"{i} {w} {i * 10} {i * 100 + 7}" for i, w in enumerate(NUMBERS)]
    lines += ["0123456789 !?.,;:'\"()[]{}<>/\\|-_+=*&^%$#@~` \t"]
    rng.shuffle(lines)
    return "\n".join(lines) + "\n"


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def repeat_to(rows: list, n: int, rng: random.Random) -> list:
    out = list(rows)
    while len(out) < n:
        out.append(rng.choice(rows))
    rng.shuffle(out)
    return out[:n]


def conversations(rng: random.Random, n: int) -> list[list[dict[str, str]]]:
    pairs = qa_pairs()
    convs = []
    for i in range(n):
        msgs = []
        if i % 3 == 0:
            msgs.append({"role": "system", "content": rng.choice(SYSTEMS)})
        for q, a in rng.sample(pairs, 1 + i % 3):
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        convs.append(msgs)
    return convs


def preference_facts() -> list[tuple[str, str, list[str]]]:
    """(question, the right answer, wrong answers of the same shape) for every fact."""
    out = []
    for table, question, answer in (
        (COLOURS, "What colour is the {k}?", "The {k} is {v}."),
        (SOUNDS, "What sound does a {k} make?", "A {k} {v}."),
        (CAPITALS, "What is the capital of {k}?", "The capital of {k} is {v}."),
        (OPPOSITES, "What is the opposite of {k}?", "The opposite of {k} is {v}."),
    ):
        values = sorted(set(table.values()))
        for k, v in table.items():
            wrong = [answer.format(k=k, v=w) for w in values if w != v]
            out.append((question.format(k=k), answer.format(k=k, v=v), wrong))
    return out


def preference_rows(rng: random.Random, n: int) -> list[dict]:
    """DPO/ORPO pairs in the shapes users bring: TRL's conversational rows, plain strings, and
    whole conversations that share their prompt (an implicit prompt)."""
    facts = preference_facts()
    rows = []
    for i in range(n):
        q, good, wrong = rng.choice(facts)
        bad = rng.choice(wrong)
        if i % 3 == 0:
            rows.append({"prompt": q, "chosen": good, "rejected": bad})
        elif i % 3 == 1:
            rows.append(
                {
                    "prompt": [{"role": "user", "content": q}],
                    "chosen": [{"role": "assistant", "content": good}],
                    "rejected": [{"role": "assistant", "content": bad}],
                }
            )
        else:
            user = {"role": "user", "content": q}
            rows.append(
                {
                    "chosen": [user, {"role": "assistant", "content": good}],
                    "rejected": [user, {"role": "assistant", "content": bad}],
                }
            )
    return rows


def kto_rows(rng: random.Random, n: int) -> list[dict]:
    """KTO rows: one answer each, labelled desirable (right) or not (wrong)."""
    rows = []
    for i in range(n):
        q, good, wrong = rng.choice(preference_facts())
        label = i % 2 == 0
        rows.append({"prompt": q, "completion": good if label else rng.choice(wrong), "label": label})
    return rows


def build() -> dict[str, str]:
    """Every output file's text by its path."""
    rng = random.Random(20261123)
    files: dict[str, str] = {}
    files["text.txt"] = "\n\n".join(paragraphs(rng, 300)) + "\n"
    files["text.jsonl"] = jsonl([{"text": p} for p in paragraphs(rng, 300)])
    qa = repeat_to(qa_pairs(), 300, rng)
    files["qa.jsonl"] = jsonl(
        [
            ({"system": SYSTEMS[0]} if i % 10 == 0 else {}) | {"question": q, "answer": a}
            for i, (q, a) in enumerate(qa)
        ]
    )
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["question", "answer"])
    writer.writerows(repeat_to(qa_pairs(), 300, rng))
    files["qa.csv"] = buf.getvalue()
    inst = repeat_to(instructions(), 300, rng)
    files["instruction.jsonl"] = jsonl(
        [
            {"instruction": i, "input": x, "output": o} if x else {"instruction": i, "output": o}
            for i, x, o in inst
        ]
    )
    files["conversations.jsonl"] = jsonl([{"messages": m} for m in conversations(rng, 300)])
    role_map = {"system": "system", "user": "human", "assistant": "gpt"}
    files["sharegpt.jsonl"] = jsonl(
        [
            {"conversations": [{"from": role_map[m["role"]], "value": m["content"]} for m in c]}
            for c in conversations(rng, 300)
        ]
    )
    files["heldout_qa.jsonl"] = jsonl([{"question": q, "answer": a} for q, a in heldout_pairs()])
    pref_rng = random.Random(20261206)  # its own stream: the files above stay as they were
    files["preference.jsonl"] = jsonl(preference_rows(pref_rng, 300))
    files["kto.jsonl"] = jsonl(kto_rows(pref_rng, 300))
    return files


def main() -> None:
    for name, text in build().items():
        (HERE / name).write_text(text, encoding="utf-8")
    ASSETS.mkdir(parents=True, exist_ok=True)
    (ASSETS / "corpus.txt").write_text(corpus(random.Random(CORPUS_SEED)), encoding="utf-8")


if __name__ == "__main__":
    main()
