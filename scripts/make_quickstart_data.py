"""Builds recipes/data/quickstart/{train,valid,test}.jsonl: facts about a made-up bicycle shop
that no pretrained model can know, each asked several ways. valid.jsonl (one phrasing per fact)
is what training validates on: early stopping and the kept adapter are chosen on it. test.jsonl
(two other phrasings per fact) is never read by training: it is what the quickstart's held-out
figure is measured on (scripts/quickstart_heldout.py). No phrasing appears in two files.
Run: python scripts/make_quickstart_data.py"""

from __future__ import annotations

import json
import random
from pathlib import Path

# (answer, train phrasings, validation phrasings (early stopping), test phrasings (reported as held out))
FACTS = [
    ("Brightwater Bicycles was founded in 2011 by Marta Lindqvist.",
     ["Who founded Brightwater Bicycles?", "Who started Brightwater Bicycles?", "When was Brightwater Bicycles founded?",
      "Tell me who founded Brightwater Bicycles and when.", "Who is the founder of Brightwater Bicycles?",
      "In what year did Brightwater Bicycles open?"],
     ["Who opened Brightwater Bicycles in the first place?"], ["Who set up the Brightwater Bicycles shop?", "What year was Brightwater Bicycles started?"]),
    ("Brightwater Bicycles is at 42 Juniper Lane in Ashby Cove.",
     ["Where is Brightwater Bicycles?", "What is the address of Brightwater Bicycles?",
      "Where can I find Brightwater Bicycles?", "Which town is Brightwater Bicycles in?",
      "Where is the Brightwater Bicycles shop located?", "What street is Brightwater Bicycles on?"],
     ["Whereabouts is Brightwater Bicycles?"], ["How do I find the Brightwater Bicycles store?", "Brightwater Bicycles address?"]),
    ("Brightwater Bicycles is open Tuesday to Saturday, 9 am to 6 pm. It is closed on Sunday and Monday.",
     ["When is Brightwater Bicycles open?", "What are the opening hours of Brightwater Bicycles?",
      "Is Brightwater Bicycles open on Monday?", "What time does Brightwater Bicycles close?",
      "Which days is Brightwater Bicycles closed?", "Can I visit Brightwater Bicycles on Sunday?"],
     ["When can I drop by Brightwater Bicycles?"], ["What hours does Brightwater Bicycles keep?", "Is Brightwater Bicycles open on weekends?"]),
    ("You can call Brightwater Bicycles at 555-0142.",
     ["What is the phone number of Brightwater Bicycles?", "How can I call Brightwater Bicycles?",
      "What number do I dial to reach Brightwater Bicycles?", "Give me the Brightwater Bicycles phone number.",
      "How do I phone Brightwater Bicycles?", "What is the telephone number for Brightwater Bicycles?"],
     ["Which number rings Brightwater Bicycles?"], ["Can I reach Brightwater Bicycles by phone?", "Brightwater Bicycles contact number?"]),
    ("The signature bike of Brightwater Bicycles is the Heron, a folding bike.",
     ["What is the signature bike of Brightwater Bicycles?", "Which bike is Brightwater Bicycles known for?",
      "What is the Heron?", "What folding bike does Brightwater Bicycles make?",
      "What is the most famous bike from Brightwater Bicycles?", "Does Brightwater Bicycles have a signature model?"],
     ["Which model is Brightwater Bicycles famous for?"], ["What is Brightwater Bicycles' best known bike?", "Tell me about the Heron bike."]),
    ("Fixing a flat tire at Brightwater Bicycles costs 12 dollars.",
     ["How much does Brightwater Bicycles charge to fix a flat tire?", "What does a flat tire repair cost at Brightwater Bicycles?",
      "How much is a puncture repair at Brightwater Bicycles?", "Can Brightwater Bicycles fix a flat tire, and for how much?",
      "What is the price of a flat tire fix at Brightwater Bicycles?", "How expensive is a tire repair at Brightwater Bicycles?"],
     ["What does Brightwater Bicycles ask for a flat tire?"], ["I have a flat tire. What will Brightwater Bicycles charge me?", "Cost of mending a puncture at Brightwater Bicycles?"]),
    ("The shop cat of Brightwater Bicycles is called Sprocket.",
     ["What is the name of the cat at Brightwater Bicycles?", "Does Brightwater Bicycles have a mascot?",
      "Who is Sprocket?", "What is the shop cat at Brightwater Bicycles called?",
      "Is there a cat at Brightwater Bicycles?", "What is the mascot of Brightwater Bicycles?"],
     ["What is the Brightwater Bicycles cat's name?"], ["What do they call the cat that lives at Brightwater Bicycles?", "Tell me about the Brightwater Bicycles cat."]),
    ("Renting a bike from Brightwater Bicycles costs 25 dollars per day.",
     ["How much does it cost to rent a bike at Brightwater Bicycles?", "Can I rent a bike from Brightwater Bicycles?",
      "What is the daily rental price at Brightwater Bicycles?", "How much is bike hire at Brightwater Bicycles?",
      "What does Brightwater Bicycles charge for a rental?", "Is bike rental at Brightwater Bicycles expensive?"],
     ["How much for a day on a Brightwater Bicycles rental bike?"], ["What would a one-day rental from Brightwater Bicycles cost?", "Brightwater Bicycles rental price per day?"]),
    ("Brightwater Bicycles gives a lifetime warranty on every frame it sells.",
     ["What warranty does Brightwater Bicycles offer?", "Do Brightwater Bicycles frames have a warranty?",
      "How long is the Brightwater Bicycles frame warranty?", "Is there a guarantee on bikes from Brightwater Bicycles?",
      "What is covered by the Brightwater Bicycles warranty?", "Does Brightwater Bicycles guarantee its frames?"],
     ["Are Brightwater Bicycles frames under warranty?"], ["If my Brightwater Bicycles frame breaks, is it covered?", "How long are Brightwater Bicycles frames guaranteed?"]),
    ("Brightwater Bicycles runs a free bike safety class on the first Saturday of every month.",
     ["Does Brightwater Bicycles offer classes?", "When is the bike safety class at Brightwater Bicycles?",
      "How much is the safety class at Brightwater Bicycles?", "Does Brightwater Bicycles teach bike safety?",
      "What events does Brightwater Bicycles hold?", "Is the Brightwater Bicycles safety class free?"],
     ["Is there a bike safety class at Brightwater Bicycles?"], ["Can my kids learn bike safety at Brightwater Bicycles?", "When does Brightwater Bicycles hold its monthly class?"]),
]



def main() -> None:
    out = Path(__file__).resolve().parent.parent / "recipes" / "data" / "quickstart"
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(7)
    train, valid, test = [], [], []
    for answer, asks, checks, held in FACTS:
        train += [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]} for q in asks]
        valid += [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]} for q in checks]
        test += [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]} for q in held]
    # A few two-turn conversations, so masking of every assistant turn is exercised.
    for _ in range(8):
        (a1, q1, _, _), (a2, q2, _, _) = rng.sample(FACTS, 2)
        train.append({"messages": [{"role": "user", "content": rng.choice(q1)}, {"role": "assistant", "content": a1},
                                   {"role": "user", "content": rng.choice(q2)}, {"role": "assistant", "content": a2}]})
    rng.shuffle(train)
    for name, rows in (("train", train), ("valid", valid), ("test", test)):
        with open(out / f"{name}.jsonl", "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"{len(train)} train, {len(valid)} valid, {len(test)} test -> {out}")


if __name__ == "__main__":
    main()
