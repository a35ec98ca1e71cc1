"""Builds bench/data/{faq,style,extract}/: three small fine-tuning tasks in different domains for
scripts/bench_forgetting.py, each with a training file and a test file of prompts never trained
on, judged by a regular expression (faq, style) or by exact JSON equality (extract).

- faq:     facts about a made-up bakery, each asked several ways; test questions are phrasings
           that appear nowhere in training.
- style:   rewrite a blunt note as a polite customer-service reply in a fixed frame; test notes
           are new sentences whose key word must be carried over.
- extract: turn an order message into JSON; test messages use names, items and towns never seen
           in training.
- multiturn: two-turn chats about a made-up bicycle workshop: the user names a service, then
           asks a follow-up ("how much?", "how long?") that only the first turn makes clear;
           test chats use first turns and follow-ups phrased as nowhere in training.

Run: python scripts/make_bench_data.py   (deterministic; the files are committed)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "bench" / "data"

# (answer, regex a correct answer must match, train phrasings, test phrasings)
FAQ = [
    ("Larkspur Bakery opened in 2016 and was founded by Tomas Okafor.", r"2016|Okafor",
     ["Who founded Larkspur Bakery?", "When did Larkspur Bakery open?", "Who started Larkspur Bakery?",
      "Who is the owner and founder of Larkspur Bakery?", "What year did Larkspur Bakery first open?",
      "Tell me about the founding of Larkspur Bakery."],
     ["Whose idea was Larkspur Bakery?", "How long ago did Larkspur Bakery get started?"]),
    ("Larkspur Bakery is at 7 Mill Street in Fernhollow.", r"Mill Street|Fernhollow",
     ["Where is Larkspur Bakery?", "What is the address of Larkspur Bakery?", "Where can I find Larkspur Bakery?",
      "Which town is Larkspur Bakery in?", "What street is Larkspur Bakery on?", "Where is the Larkspur Bakery shop?"],
     ["How do I get to Larkspur Bakery?", "Larkspur Bakery location?"]),
    ("Larkspur Bakery opens at 6 am and closes at 2 pm, every day except Wednesday.", r"6 ?am|2 ?pm|Wednesday",
     ["When is Larkspur Bakery open?", "What are the opening hours of Larkspur Bakery?",
      "What time does Larkspur Bakery open?", "When does Larkspur Bakery close?",
      "Which day is Larkspur Bakery closed?", "Is Larkspur Bakery open on Wednesday?"],
     ["What hours does Larkspur Bakery keep?", "Can I buy bread at Larkspur Bakery early in the morning?"]),
    ("The best-selling loaf at Larkspur Bakery is the Hazel Rye, a dark rye with toasted hazelnuts.", r"Hazel Rye",
     ["What is the best-selling bread at Larkspur Bakery?", "Which loaf is Larkspur Bakery famous for?",
      "What is the Hazel Rye?", "What is the most popular loaf at Larkspur Bakery?",
      "What bread should I try at Larkspur Bakery?", "Does Larkspur Bakery have a signature loaf?"],
     ["What do most customers buy at Larkspur Bakery?", "Which Larkspur Bakery bread is the favourite?"]),
    ("A loaf of sourdough at Larkspur Bakery costs 6 dollars.", r"\b6 dollars|\$6\b",
     ["How much is sourdough at Larkspur Bakery?", "What does a sourdough loaf cost at Larkspur Bakery?",
      "What is the price of sourdough at Larkspur Bakery?", "How expensive is the sourdough at Larkspur Bakery?",
      "How much does Larkspur Bakery charge for sourdough?", "Is the sourdough at Larkspur Bakery cheap?"],
     ["If I buy a sourdough at Larkspur Bakery, what will I pay?", "Larkspur Bakery sourdough price?"]),
    ("You can call Larkspur Bakery at 555-0199.", r"555-0199",
     ["What is the phone number of Larkspur Bakery?", "How can I call Larkspur Bakery?",
      "What number do I dial for Larkspur Bakery?", "Give me the Larkspur Bakery phone number.",
      "How do I phone Larkspur Bakery?", "What is the telephone number of Larkspur Bakery?"],
     ["Can I reach Larkspur Bakery by phone?", "Larkspur Bakery contact number?"]),
    ("The bakery dog at Larkspur Bakery is a beagle called Crumb.", r"Crumb",
     ["What is the name of the dog at Larkspur Bakery?", "Does Larkspur Bakery have a dog?",
      "Who is Crumb?", "What is the bakery dog at Larkspur Bakery called?",
      "Is there a pet at Larkspur Bakery?", "What kind of dog lives at Larkspur Bakery?"],
     ["What do they call the beagle at Larkspur Bakery?", "Tell me about the Larkspur Bakery dog."]),
    ("Larkspur Bakery delivers within Fernhollow for a fee of 3 dollars.", r"3 dollars|\$3\b",
     ["Does Larkspur Bakery deliver?", "How much is delivery from Larkspur Bakery?",
      "Can Larkspur Bakery bring bread to my house?", "What does Larkspur Bakery charge for delivery?",
      "Where does Larkspur Bakery deliver?", "Is delivery from Larkspur Bakery free?"],
     ["Can I get Larkspur Bakery bread delivered?", "Larkspur Bakery delivery cost?"]),
]

# (blunt note, key word the reply must carry over)
STYLE_TRAIN = [
    ("Your parcel is late.", "parcel"), ("We lost your order.", "order"), ("The printer is broken.", "printer"),
    ("Your refund was rejected.", "refund"), ("The store is closed today.", "store"),
    ("Your invoice is wrong.", "invoice"), ("The train is cancelled.", "train"), ("Your card was declined.", "card"),
    ("The app is down.", "app"), ("Your ticket expired.", "ticket"), ("The lift is out of order.", "lift"),
    ("Your booking is gone.", "booking"), ("The shipment is delayed.", "shipment"), ("Your password expired.", "password"),
    ("The meeting is moved.", "meeting"), ("Your subscription ended.", "subscription"),
    ("The website is slow.", "website"), ("Your seat was given away.", "seat"), ("The heater is broken.", "heater"),
    ("Your account is locked.", "account"), ("The bus is full.", "bus"), ("Your coupon is invalid.", "coupon"),
    ("The kitchen is closed.", "kitchen"), ("Your package was damaged.", "package"), ("The flight is overbooked.", "flight"),
    ("Your warranty is void.", "warranty"), ("The pool is closed.", "pool"), ("Your parking permit expired.", "permit"),
    ("The delivery van broke down.", "van"), ("Your table is not ready.", "table"), ("The shop ran out of milk.", "milk"),
    ("Your membership was cancelled.", "membership"), ("The road is blocked.", "road"), ("Your email bounced.", "email"),
    ("The oven is not working.", "oven"), ("Your repair will take longer.", "repair"), ("The gym is full.", "gym"),
    ("Your laptop cannot be fixed.", "laptop"), ("The museum is closed on Monday.", "museum"),
    ("Your reservation was lost.", "reservation"), ("The phone line is busy.", "phone"), ("Your bill is overdue.", "bill"),
    ("The cinema sold out.", "cinema"), ("Your visa was refused.", "visa"), ("The bridge is closed.", "bridge"),
    ("Your loan was denied.", "loan"), ("The cafe has no seats.", "cafe"), ("Your photos were deleted.", "photos"),
    ("The course is full.", "course"), ("Your bike was stolen.", "bike"), ("The library is closed.", "library"),
    ("Your order was sent twice.", "order"), ("The fridge is leaking.", "fridge"), ("Your name is misspelled.", "name"),
    ("The taxi is late.", "taxi"), ("Your voucher expired.", "voucher"), ("The server crashed.", "server"),
    ("Your claim was refused.", "claim"), ("The hotel is fully booked.", "hotel"), ("Your shoes are out of stock.", "shoes"),
]
STYLE_TEST = [
    ("Your suitcase is missing.", "suitcase"), ("The elevator is stuck.", "elevator"), ("Your camera is broken.", "camera"),
    ("The concert is cancelled.", "concert"), ("Your tablet was not shipped.", "tablet"), ("The garden is closed.", "garden"),
    ("Your sofa will arrive late.", "sofa"), ("The ferry is delayed.", "ferry"), ("Your wallet was not found.", "wallet"),
    ("The bakery sold out of bread.", "bread"), ("Your lamp was sent to the wrong address.", "lamp"),
    ("The stadium is full.", "stadium"),
]
STYLE_PROMPT = "Rewrite this note as a polite customer-service reply: {note}"
STYLE_REGEX = r"^Dear customer,.*\b{key}\b.*Kind regards, the Support Team\.$"


def polite(note: str, key: str, rng: random.Random) -> str:
    opener = rng.choice(["we are very sorry to tell you that", "we regret to let you know that",
                         "we apologise, but"])
    body = note[0].lower() + note[1:]
    body = body.replace("Your ", "your ").replace(" your ", " your ")
    return f"Dear customer, {opener} {body[:-1]}. We will do our best to help. Kind regards, the Support Team."


NAMES_TRAIN = ["Anna", "Ben", "Chloe", "David", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Keiko",
               "Liam", "Maya", "Noah", "Olga", "Pedro", "Quinn", "Rosa", "Sami", "Tara"]
NAMES_TEST = ["Ulrich", "Vera", "Wanda", "Xavier", "Yusuf", "Zoe", "Bruno", "Clara"]
ITEMS_TRAIN = ["chair", "lamp", "kettle", "blanket", "mug", "pillow", "towel", "candle", "basket", "rug"]
ITEMS_TEST = ["bucket", "clock", "vase", "stool"]
TOWNS_TRAIN = ["Oakridge", "Millbrook", "Riverton", "Stonefield", "Ashford", "Brookvale", "Cedarton", "Elmwood"]
TOWNS_TEST = ["Pinehurst", "Willowby", "Marshgate", "Foxley"]
ORDER_TEMPLATES = [
    "Hi, this is {name}. I would like {qty} {item}s sent to {town}, please.",
    "Hello! {name} here. Please ship {qty} {item}s to {town}.",
    "Can you deliver {qty} {item}s to {town}? Thanks, {name}",
    "{name} from {town} wants to order {qty} {item}s.",
]
EXTRACT_PROMPT = "Extract the order as JSON with keys name, item, quantity, town: {msg}"


# (service, what the first answer says, price, duration, train first turns, test first turns)
SERVICES = [
    ("puncture repair", "We fix punctures while you wait.", "8 pounds", "20 minutes",
     ["I have a flat tyre.", "My inner tube has a hole.", "Can you repair a puncture?"],
     ["My tyre keeps going soft overnight."]),
    ("brake tune", "We adjust and bleed brakes on any bike.", "15 pounds", "40 minutes",
     ["My brakes squeal.", "Can you look at my brakes?", "My brake lever pulls all the way to the bar."],
     ["My bike takes ages to stop."]),
    ("full service", "Our full service covers gears, brakes, wheels and bearings.", "60 pounds", "two days",
     ["I want my bike fully serviced.", "Do you do a complete service?", "My bike needs a full check-up."],
     ["Could you go over the whole bike for me?"]),
    ("wheel truing", "We true buckled wheels on the stand.", "12 pounds", "30 minutes",
     ["My wheel is buckled.", "My rim wobbles when it spins.", "Can you straighten a wheel?"],
     ["The front wheel rubs the brake pad on every turn."]),
    ("chain replacement", "We replace worn chains and check the cassette.", "25 pounds", "25 minutes",
     ["My chain keeps slipping.", "I think my chain is worn out.", "Can you fit a new chain?"],
     ["The chain jumps when I pedal hard."]),
]
FOLLOW_UPS = {"price": (["How much does that cost?", "What is the price?", "How much will I pay?"],
                        ["What would that set me back?"]),
              "duration": (["How long does it take?", "How long will it be?", "When can I pick it up?"],
                           ["How soon will it be ready?"])}
WORKSHOP = "Kestrel Cycles"


def multiturn_chat(first: str, said: str, follow: str, answer: str | None) -> dict:
    messages = [{"role": "user", "content": f"{first} Can {WORKSHOP} help?"},
                {"role": "assistant", "content": said}, {"role": "user", "content": follow}]
    return {"messages": messages + ([{"role": "assistant", "content": answer}] if answer else [])}


def multiturn_rows(test: bool) -> list[dict]:
    rows = []
    for service, said, price, duration, train_first, test_first in SERVICES:
        for kind, value in (("price", price), ("duration", duration)):
            follows = FOLLOW_UPS[kind][1 if test else 0]
            for first in (test_first if test else train_first):
                for follow in follows:
                    answer = f"The {service} at {WORKSHOP} " + (f"costs {value}." if kind == "price"
                                                                 else f"takes {value}.")
                    row = multiturn_chat(first, said, follow, None if test else answer)
                    if test:
                        row["expect"] = value.replace(" ", " ?")
                    rows.append(row)
    return rows


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def chat(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def build() -> None:
    rng = random.Random(0)
    faq_train = [chat(q, answer) for answer, _, train, _ in FAQ for q in train]
    rng.shuffle(faq_train)
    write(OUT / "faq" / "train.jsonl", faq_train)
    write(OUT / "faq" / "test.jsonl", [{"prompt": q, "expect": rx} for _, rx, _, test in FAQ for q in test])

    style_train = [chat(STYLE_PROMPT.format(note=n), polite(n, k, rng)) for n, k in STYLE_TRAIN]
    write(OUT / "style" / "train.jsonl", style_train)
    write(OUT / "style" / "test.jsonl", [{"prompt": STYLE_PROMPT.format(note=n), "expect": STYLE_REGEX.format(key=k)}
                                         for n, k in STYLE_TEST])

    def orders(names, items, towns, n):
        out = []
        for i in range(n):
            rec = {"name": rng.choice(names), "item": rng.choice(items), "quantity": rng.randint(2, 9),
                   "town": rng.choice(towns)}
            msg = ORDER_TEMPLATES[i % len(ORDER_TEMPLATES)].format(qty=rec["quantity"], **rec)
            out.append((EXTRACT_PROMPT.format(msg=msg), rec))
        return out

    write(OUT / "extract" / "train.jsonl",
          [chat(p, json.dumps(r)) for p, r in orders(NAMES_TRAIN, ITEMS_TRAIN, TOWNS_TRAIN, 64)])
    write(OUT / "extract" / "test.jsonl",
          [{"prompt": p, "expect_json": r} for p, r in orders(NAMES_TEST, ITEMS_TEST, TOWNS_TEST, 12)])

    multiturn_train = multiturn_rows(test=False)
    rng.shuffle(multiturn_train)
    write(OUT / "multiturn" / "train.jsonl", multiturn_train)
    write(OUT / "multiturn" / "test.jsonl", multiturn_rows(test=True))


if __name__ == "__main__":
    build()
    for task in ("faq", "style", "extract", "multiturn"):
        n = {f: sum(1 for _ in open(OUT / task / f"{f}.jsonl")) for f in ("train", "test")}
        print(f"{task}: {n['train']} train, {n['test']} test -> {OUT / task}")
