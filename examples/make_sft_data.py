"""Generate the small SFT datasets dlm-adapt ships in recipes/sft/data/ (deterministic for a given seed).

    python examples/make_sft_data.py chat recipes/sft/data/tiny-chat.jsonl              # `messages`, multi-turn
    python examples/make_sft_data.py instructions recipes/sft/data/instructions.jsonl   # instruction/input/output

`chat`: TinyStories-vocabulary conversations for stories260K: short stories on request, colours, and
follow-up questions whose answers are in the conversation. `instructions`: small checkable tasks (arithmetic,
counting, reversing, capital letters) in the Alpaca format. Every answer is determined by its prompt, so a
few minutes of SFT visibly change the model.
"""

import argparse
import json
import random
from pathlib import Path

NAMES = ["Lily", "Tom", "Sue", "Ben", "Anna", "Max", "Mia", "Sam"]
ANIMALS = ["dog", "cat", "bird", "fish", "frog", "bunny", "bear", "duck"]
THINGS = ["ball", "box", "hat", "car", "kite", "cake", "tree", "boat"]
COLORS = ["red", "blue", "green", "yellow", "pink", "big", "little", "happy"]


def chat_example(rng: random.Random) -> dict:
    name, animal, thing, color = rng.choice(NAMES), rng.choice(ANIMALS), rng.choice(THINGS), rng.choice(COLORS)
    kind = rng.randrange(3)
    if kind == 0:
        story = (f"Once upon a time, there was a {color} {animal} named {name}. {name} had a {thing}. "
                 f"{name} played with the {thing} every day and was very happy.")
        messages = [{"role": "user", "content": f"Tell me a story about a {animal} named {name}."},
                    {"role": "assistant", "content": story}]
        if rng.random() < 0.5:  # a second turn answered from the first
            messages += [{"role": "user", "content": f"What did {name} have?"},
                         {"role": "assistant", "content": f"{name} had a {thing}."}]
        return {"messages": messages}
    if kind == 1:
        return {"messages": [{"role": "user", "content": f"The {thing} is {color}. What is the {thing}?"},
                             {"role": "assistant", "content": f"The {thing} is {color}."}]}
    return {"messages": [{"role": "user", "content": f"Who is {name}?"},
                         {"role": "assistant", "content": f"{name} is a {color} {animal}."}]}


def instruction_example(rng: random.Random) -> dict:
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randrange(1, 50), rng.randrange(1, 50)
        return {"instruction": "Add the two numbers.", "input": f"{a} + {b}", "output": f"{a} + {b} = {a + b}"}
    words = rng.sample(THINGS + ANIMALS, rng.randrange(3, 6))
    text = " ".join(words)
    if kind == 1:
        return {"instruction": "How many words are in this text?", "input": text,
                "output": f"There are {len(words)} words."}
    if kind == 2:
        return {"instruction": "Write the words in reverse order.", "input": text, "output": " ".join(words[::-1])}
    return {"instruction": "Write the text in capital letters.", "input": text, "output": text.upper()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["chat", "instructions"])
    parser.add_argument("output")
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    make = chat_example if args.kind == "chat" else instruction_example
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(make(rng)) + "\n" for _ in range(args.samples)))
    tmp.rename(out)
    print(f"wrote {args.samples} {args.kind} samples to {out}")


if __name__ == "__main__":
    main()
