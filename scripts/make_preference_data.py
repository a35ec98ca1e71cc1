"""Write the two preference sets the project ships (recipes dpo and orpo) and benchmarks
(scripts/bench_preference.py): a content preference and a tone/format preference, each with
train and valid pairs and held-out test prompts the training never sees, judged by regex.

    policy  Brightwater Bicycles customer questions. Chosen answers cite the shop's real policy;
            rejected ones invent a friendlier policy. Test prompts are new phrasings of the same
            questions; an answer follows the preference when it states the policy's key fact.
    brief   General questions. Chosen answers open with "In short:" and give one sentence;
            rejected ones hedge at length. Test prompts are questions on other topics; an answer
            follows the preference when it opens with "In short:".

Run: python scripts/make_preference_data.py   (rewrites mlxft/recipes/data/{dpo,orpo}/)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "mlxft" / "recipes" / "data"

# (topic key fact regex, the policy sentence, an invented policy, six phrasings of the question)
POLICIES = [
    (r"30 days", "Brightwater Bicycles accepts returns within 30 days with the receipt.",
     "Brightwater Bicycles takes returns any time, no receipt needed.",
     ["Can I return a bike to Brightwater Bicycles?", "What is the return policy at Brightwater Bicycles?",
      "How long do I have to return something to Brightwater Bicycles?", "Does Brightwater Bicycles take returns?",
      "I changed my mind about my new bike from Brightwater Bicycles. Can I bring it back?",
      "Is there a time limit on returns at Brightwater Bicycles?"]),
    (r"lifetime", "Brightwater Bicycles gives a lifetime warranty on every frame it sells.",
     "Brightwater Bicycles frames come with a one-year warranty.",
     ["What warranty does Brightwater Bicycles give on frames?", "Is my Brightwater Bicycles frame under warranty?",
      "How long is the frame warranty at Brightwater Bicycles?", "Does Brightwater Bicycles guarantee its frames?",
      "My frame from Brightwater Bicycles cracked after three years. Is it covered?",
      "Tell me about the Brightwater Bicycles frame warranty."]),
    (r"two business days|2 business days", "Brightwater Bicycles finishes repairs within two business days.",
     "Brightwater Bicycles repairs usually take about three weeks.",
     ["How long does a repair take at Brightwater Bicycles?", "When will Brightwater Bicycles finish fixing my bike?",
      "What is the repair turnaround at Brightwater Bicycles?", "How fast are repairs at Brightwater Bicycles?",
      "I dropped my bike off at Brightwater Bicycles for a repair. When can I pick it up?",
      "How many days does Brightwater Bicycles need for a repair?"]),
    (r"50 dollar", "Brightwater Bicycles asks a 50 dollar deposit for every rental bike.",
     "Brightwater Bicycles rents bikes without any deposit.",
     ["Is there a deposit to rent a bike at Brightwater Bicycles?", "How much is the rental deposit at Brightwater Bicycles?",
      "Do I pay a deposit when renting from Brightwater Bicycles?", "What does Brightwater Bicycles charge as a rental deposit?",
      "I want to rent a bike at Brightwater Bicycles tomorrow. Do I need to leave money as a deposit?",
      "Does Brightwater Bicycles want a deposit for rentals?"]),
    (r"14 days", "Brightwater Bicycles matches a local shop's lower price within 14 days of purchase.",
     "Brightwater Bicycles matches any price from any website, forever.",
     ["Does Brightwater Bicycles match prices?", "What is the price match policy at Brightwater Bicycles?",
      "I found my bike cheaper at another shop. Will Brightwater Bicycles match it?",
      "Can Brightwater Bicycles refund the difference if I find a lower price?",
      "How does price matching work at Brightwater Bicycles?", "Will Brightwater Bicycles beat a competitor's price?"]),
    (r"photo ID", "Brightwater Bicycles lends test-ride bikes for 20 minutes against a photo ID.",
     "Brightwater Bicycles lets you take test-ride bikes home for the weekend.",
     ["Can I test ride a bike at Brightwater Bicycles?", "How do test rides work at Brightwater Bicycles?",
      "What do I need for a test ride at Brightwater Bicycles?", "How long can I test ride a bike at Brightwater Bicycles?",
      "Does Brightwater Bicycles let me try a bike before buying?",
      "I'd like to try out a road bike at Brightwater Bicycles. What are the rules?"]),
    (r"free", "Brightwater Bicycles gives a free safety check in the first month after purchase.",
     "Brightwater Bicycles charges 40 dollars for every safety check.",
     ["Does Brightwater Bicycles check my new bike after I buy it?", "Is the first tune-up free at Brightwater Bicycles?",
      "What service do I get after buying a bike at Brightwater Bicycles?",
      "Does Brightwater Bicycles offer a check-up for new bikes?",
      "I bought a bike at Brightwater Bicycles two weeks ago. Can they look it over?",
      "How much is the first safety check at Brightwater Bicycles?"]),
    (r"worn", "Brightwater Bicycles cannot take back helmets once they have been worn.",
     "Brightwater Bicycles takes back helmets even after you have crashed in them.",
     ["Can I return a helmet to Brightwater Bicycles?", "What is the helmet return policy at Brightwater Bicycles?",
      "I wore my new helmet once. Will Brightwater Bicycles take it back?",
      "Does Brightwater Bicycles accept helmet returns?", "Are helmets returnable at Brightwater Bicycles?",
      "Can I exchange a used helmet at Brightwater Bicycles?"]),
]

# (question, a one-sentence answer)
FACTS = [
    ("Why is the sky blue?", "air scatters blue sunlight more than red light"),
    ("What is the boiling point of water at sea level?", "water boils at 100 degrees Celsius"),
    ("How many continents are there?", "there are seven continents"),
    ("What do bees make?", "bees make honey and wax"),
    ("What is the largest planet in our solar system?", "Jupiter is the largest planet"),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote it"),
    ("What gas do plants take in?", "plants take in carbon dioxide"),
    ("How many days are in a leap year?", "a leap year has 366 days"),
    ("What is the capital of Japan?", "the capital of Japan is Tokyo"),
    ("What is H2O?", "H2O is water"),
    ("How many sides does a hexagon have?", "a hexagon has six sides"),
    ("What is the freezing point of water?", "water freezes at 0 degrees Celsius"),
    ("Which organ pumps blood?", "the heart pumps blood"),
    ("What is the fastest land animal?", "the cheetah is the fastest land animal"),
    ("What language is spoken in Brazil?", "Brazilians speak Portuguese"),
    ("How many legs does an insect have?", "an insect has six legs"),
    ("What is the chemical symbol for gold?", "the symbol for gold is Au"),
    ("Why do we have seasons?", "the tilt of the Earth's axis causes seasons"),
    ("What is photosynthesis?", "plants turn light, water and carbon dioxide into sugar"),
    ("How many minutes are in an hour?", "an hour has 60 minutes"),
    ("What is the tallest mountain on Earth?", "Mount Everest is the tallest"),
    ("What do caterpillars turn into?", "caterpillars turn into butterflies or moths"),
    ("What is the largest ocean?", "the Pacific is the largest ocean"),
    ("Which planet is called the red planet?", "Mars is the red planet"),
    ("What is the main ingredient of guacamole?", "guacamole is made from avocado"),
    ("How many strings does a standard guitar have?", "a standard guitar has six strings"),
    ("What instrument has 88 keys?", "a piano has 88 keys"),
    ("What is the square root of 81?", "the square root of 81 is 9"),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci painted it"),
    ("What is the currency of the United Kingdom?", "the UK uses the pound sterling"),
    ("How many players are on a football team on the field?", "each team has eleven players on the field"),
    ("What do you call a baby cat?", "a baby cat is a kitten"),
    ("What is the longest river in Africa?", "the Nile is the longest river in Africa"),
    ("Which metal is liquid at room temperature?", "mercury is liquid at room temperature"),
    ("What does a thermometer measure?", "a thermometer measures temperature"),
    ("How many hours are in a day?", "a day has 24 hours"),
    ("What is the smallest prime number?", "the smallest prime number is 2"),
    ("What do pandas mostly eat?", "pandas mostly eat bamboo"),
    ("What is the opposite of north?", "the opposite of north is south"),
    ("What shape has three sides?", "a triangle has three sides"),
    ("Which bird is a symbol of peace?", "the dove is a symbol of peace"),
    ("What is the hardest natural material?", "diamond is the hardest natural material"),
    ("How many wheels does a tricycle have?", "a tricycle has three wheels"),
    ("What colour do you get by mixing blue and yellow?", "blue and yellow make green"),
    ("What is the capital of Italy?", "the capital of Italy is Rome"),
    ("What does a compass show?", "a compass shows which way is north"),
    ("What is 12 times 12?", "12 times 12 is 144"),
    ("Where do penguins mostly live?", "most penguins live in the Southern Hemisphere"),
    ("What is the largest mammal?", "the blue whale is the largest mammal"),
    ("What is the main gas in the air we breathe?", "the air is mostly nitrogen"),
    ("How many weeks are in a year?", "a year has 52 weeks"),
    ("What is the capital of Canada?", "the capital of Canada is Ottawa"),
    ("What does a bicycle chain do?", "the chain carries the pedalling force to the rear wheel"),
    ("Why do leaves change colour in autumn?", "the green chlorophyll breaks down and other colours show"),
    ("What is the speed of sound in air?", "sound travels about 343 metres per second in air"),
    ("What is a haiku?", "a haiku is a short Japanese poem of three lines"),
    ("How many bones are in the adult human body?", "an adult has 206 bones"),
    ("What is the closest star to Earth?", "the Sun is the closest star"),
    ("What do you call frozen rain?", "frozen rain is called hail or sleet"),
    ("What is the capital of Australia?", "the capital of Australia is Canberra"),
    ("How many centimetres are in a metre?", "a metre has 100 centimetres"),
    ("What is the main language of Mexico?", "most Mexicans speak Spanish"),
]

HEDGES = [
    "Well, that is a really interesting question, and there are many ways to look at it. Broadly speaking, {a}, "
    "although of course the details can depend on context and you may want to check other sources too.",
    "Great question! I would say it depends on a lot of things, but as far as I know {a}. There is more to it, "
    "so it might be worth reading up on the topic if you are curious.",
    "Hmm, let me think about this carefully. There are several factors involved, and people sometimes disagree, "
    "but generally {a}. I hope that helps, and let me know if you want a longer explanation!",
]


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def policy_set() -> dict[str, list[dict]]:
    train, valid, test = [], [], []
    for k, (judge, good, bad, questions) in enumerate(POLICIES):
        for i, q in enumerate(questions):
            pair = {"prompt": q, "chosen": f"Per our policy: {good}", "rejected": f"Sure! {bad}"}
            if i < 4:
                train.append(pair)
            elif i == 4:
                valid.append(pair)
            else:
                test.append({"prompt": q, "judge": judge})
    return {"train": train, "valid": valid, "test": test}


def brief_set() -> dict[str, list[dict]]:
    rng = random.Random(0)
    facts = list(FACTS)
    rng.shuffle(facts)
    pairs = [{"prompt": q, "chosen": f"In short: {a}.", "rejected": HEDGES[i % len(HEDGES)].format(a=a)}
             for i, (q, a) in enumerate(facts)]
    test = [{"prompt": q, "judge": r"^\s*In short:"} for q, _ in facts[-12:]]
    return {"train": pairs[:40], "valid": pairs[40:50], "test": test}


def main() -> None:
    for name, sets in (("dpo", policy_set()), ("orpo", brief_set())):
        for split, rows in sets.items():
            write(ROOT / name / f"{split}.jsonl", rows)
            print(f"{ROOT / name / f'{split}.jsonl'}: {len(rows)}")


if __name__ == "__main__":
    main()
