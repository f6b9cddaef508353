"""Generate the bundled customer-support triage data set (deterministic, seeded).

    python scripts/make_tickets.py  # data/raw/tickets.jsonl and data/eval/tickets_test.jsonl
    python scripts/make_tickets.py --rows 1500 --seed 7 --out /tmp/t.jsonl

Each row is a chat record: a system prompt, the customer's ticket, and the assistant's triage
as one line of JSON naming an urgency and a category. The ticket text carries the signal:
a topic sentence decides the category and an impact sentence decides the urgency. Some tickets
mention two topics (the label follows what the customer asks to have fixed) or have no impact
cue (low for product feedback, medium otherwise), so a model has to read, not pattern-match one
word. A few percent of the rows carry the defects real exports have, so the data stages have
work to do: exact and near duplicates, a missing or empty assistant turn, an unknown role,
the same ticket with conflicting labels, an over-long ticket and malformed JSON lines.
The test set is separate and clean: tickets drawn from their own seeded stream, kept in
data/eval/ so that adding training rows never moves it (data.test_path).

The output file is committed; regenerate only when changing the task.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SYSTEM_PROMPT = (
    "You triage customer-support tickets. Reply with one line of JSON and nothing else: "
    '{"urgency": "<low|medium|high|critical>", "category": '
    '"<billing|technical|account|shipping|product>"}'
)

# Topic sentences per category; {slots} are filled from SLOTS below.
TOPICS = {
    "billing": [
        "I was charged twice for my {plan} subscription this month.",
        "My invoice {invoice} shows {amount} but my plan costs less than that.",
        "The card payment for order {order} failed but the money left my account.",
        "Why did my monthly bill go up to {amount} without any notice?",
        "I need a corrected invoice with our VAT number for {company}.",
        "You renewed my {plan} plan after I cancelled it and charged {amount}.",
        "There is a charge of {amount} on my statement that I don't recognise.",
        "Our company card was billed {amount} for seats we never added.",
        "The promo code {promo} was not applied to my last invoice.",
        "Please explain the extra fee of {amount} on invoice {invoice}.",
    ],
    "technical": [
        "The {app} app crashes every time I open the {screen} screen.",
        "Your API returns error {code} for every request since this morning.",
        "Sync between the desktop client and the {app} app stopped working.",
        "I get a blank page after logging in on {browser}.",
        "Exports to CSV time out when the report has more than {count} rows.",
        "The webhook to our endpoint keeps failing with a {code} status.",
        "Uploads get stuck at 99% and never finish on {browser}.",
        "The dashboard shows wrong numbers since the last update of the {app} app.",
        "Notifications stopped arriving on my phone after the {version} update.",
        "The integration with {tool} disconnects every few minutes.",
    ],
    "account": [
        "I can't log in, the password reset email never arrives.",
        "My account got locked after too many login attempts.",
        "Please change the email address on my account to {email}.",
        "I want to delete my account and all my personal data.",
        "Two-factor authentication codes are rejected when I sign in.",
        "I need to transfer the account owner role to {name}.",
        "Someone else seems to have logged into my account from {city}.",
        "How do I merge my two accounts into one?",
        "My username shows the wrong name after I changed it to {name}.",
        "I can't add {name} as a new user to our team workspace.",
    ],
    "shipping": [
        "My order {order} still hasn't arrived after {days} days.",
        "The tracking number for order {order} shows no updates.",
        "The package arrived damaged and the {item} inside is broken.",
        "I received the wrong item: I ordered a {item} but got something else.",
        "Can I change the delivery address for order {order} to {city}?",
        "The courier marked order {order} as delivered but nothing came.",
        "Half of order {order} is missing, only {count} of the items arrived.",
        "Delivery to {city} was promised for today but it's been postponed again.",
        "Customs is holding order {order} and asks for documents.",
        "My parcel was returned to sender without any attempt to deliver.",
    ],
    "product": [
        "It would be great if the {app} app had a dark mode.",
        "Could you add an export to PDF for the {screen} screen?",
        "Do you plan to support {tool} as an integration?",
        "I'd like to suggest keyboard shortcuts for the {screen} screen.",
        "Is there a way to schedule reports weekly instead of daily?",
        "Please bring back the old layout of the {screen} screen, the new one is harder to use.",
        "Will the {item} be available in other colours?",
        "Can you add more languages to the {app} app, for example Polish?",
        "A bulk edit option for {screen} would save us a lot of time.",
        "Does the {plan} plan include the new analytics features?",
    ],
}

# Impact sentences per urgency. Empty string = no cue (see module docstring).
IMPACT = {
    "critical": [
        "Our whole team is blocked and production is down.",
        "This is stopping all our sales right now, we are losing money every minute.",
        "None of our {count} employees can work until this is fixed.",
        "Our customers can't check out at all, please treat this as an emergency.",
        "This is a security issue and we need it handled immediately.",
    ],
    "high": [
        "I need this resolved today, we have a deadline tomorrow.",
        "This is blocking my work, please help as soon as possible.",
        "I have a client presentation in a few hours and need this fixed.",
        "It's been three days and I've already written twice, please hurry.",
        "Several people on my team are affected and can't finish their tasks.",
    ],
    "medium": [
        "It's annoying but I can work around it for now.",
        "Please look into it this week if you can.",
        "Not urgent, but I'd like an answer in the next few days.",
        "It happens a few times a day.",
    ],
    "low": [
        "No rush at all, whenever you get a chance.",
        "Just curious, this is not blocking anything.",
        "Low priority, just wanted to let you know.",
        "Take your time, it's only a minor thing.",
    ],
}

GREETINGS = [
    "",
    "",
    "Hi,",
    "Hello,",
    "Hi there,",
    "Good morning,",
    "Dear support,",
    "Hey,",
    "Hi {name},",
    "Hello team,",
    "Good afternoon,",
]
CLOSINGS = [
    "",
    "",
    "Thanks.",
    "Thank you!",
    "Regards, {name}",
    "Best, {name}",
    "Cheers",
    "Thanks, {name} from {company}",
    "Kind regards, {name}",
    "-- {name}, {city} office",
]
# Context customers add: account ids, dates, what they tried. Neutral for the labels.
CONTEXT = [
    "My account ID is {n6}.",
    "I'm on the {plan} plan.",
    "This started on {date}.",
    "I already tried logging out and back in.",
    "We have been customers since {year}.",
    "I'm writing from the {city} office.",
    "I contacted you on {date} about something else.",
    "Ticket {n5} was closed without an answer.",
    "I use the {app} app mostly.",
    "Our workspace is called {company}.",
]

SLOTS = {
    "plan": ["Pro", "Business", "Starter", "Team", "Enterprise"],
    "invoice": ["INV-{n4}", "#{n5}", "2026-{n4}"],
    "amount": ["$19.99", "$49", "€120", "$240.00", "£35", "$1,200"],
    "order": ["#{n5}", "A{n6}", "ORD-{n5}"],
    "company": ["Acme GmbH", "Northwind Ltd", "Blue Fjord AS", "Orbital SRL"],
    "promo": ["SPRING20", "WELCOME10", "BLACKFRIDAY"],
    "app": ["iOS", "Android", "mobile", "desktop", "web"],
    "screen": ["reports", "settings", "invoices", "projects", "calendar"],
    "code": ["500", "502", "401", "429", "503"],
    "browser": ["Chrome", "Firefox", "Safari", "Edge"],
    "count": ["200", "5,000", "40", "12", "3"],
    "tool": ["Slack", "Salesforce", "Zapier", "Google Drive", "Jira"],
    "version": ["4.2", "5.0.1", "latest", "March"],
    "email": ["anna.k@example.com", "j.doe@example.org", "ops@example.net"],
    "name": ["Anna", "Marek", "Priya", "Tom", "Lucía", "Chen"],
    "city": ["Berlin", "Lyon", "Austin", "Kraków", "Osaka", "Leeds"],
    "days": ["10", "14", "7", "21"],
    "item": ["headset", "charger", "keyboard", "monitor stand", "backpack"],
    "date": ["Monday", "November 3", "last Friday", "the 12th", "yesterday", "two weeks ago"],
    "year": ["2019", "2021", "2023", "2024"],
    "n5": ["{n5}"],
    "n6": ["{n6}"],
}

CATEGORIES = list(TOPICS)
URGENCIES = ["low", "medium", "high", "critical"]
# Tickets without an impact cue: product feedback is low, everything else medium.
NO_CUE_URGENCY = {"product": "low"}


def fill(template: str, rng: random.Random) -> str:
    def slot(name: str) -> str:
        value = rng.choice(SLOTS[name])
        return value.format(
            n4=rng.randint(1000, 9999), n5=rng.randint(10000, 99999), n6=rng.randint(100000, 999999)
        )

    out = template
    for name in SLOTS:
        while "{" + name + "}" in out:
            out = out.replace("{" + name + "}", slot(name), 1)
    return out


def answer(urgency: str, category: str) -> str:
    return json.dumps({"urgency": urgency, "category": category})


def record(ticket: str, urgency: str, category: str) -> dict:
    return {
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": ticket},
            {"role": "assistant", "content": answer(urgency, category)},
        ]
    }


def make_ticket(rng: random.Random) -> tuple[str, str, str]:
    category = rng.choice(CATEGORIES)
    # Product feedback is rarely urgent; outages rarely low. Realistic skew, not a rule.
    weights = {"product": [5, 3, 1, 0.3]}.get(category, [1.2, 2, 2, 1])
    urgency = rng.choices(URGENCIES, weights=weights)[0]
    parts = [fill(rng.choice(TOPICS[category]), rng)]
    if rng.random() < 0.15:
        # A second, secondary topic the customer mentions in passing; the first stays the ask.
        other = rng.choice([c for c in CATEGORIES if c != category])
        parts.append("Also, unrelated: " + fill(rng.choice(TOPICS[other]), rng).lower())
    if rng.random() < 0.12:
        urgency = NO_CUE_URGENCY.get(category, "medium")  # no impact cue at all
    else:
        impact = fill(rng.choice(IMPACT[urgency]), rng)
        parts.insert(rng.choice([0, len(parts)]) if rng.random() < 0.3 else len(parts), impact)
    if rng.random() < 0.6:
        parts.insert(rng.randrange(len(parts) + 1), fill(rng.choice(CONTEXT), rng))
    greeting = fill(rng.choice(GREETINGS), rng)
    closing = fill(rng.choice(CLOSINGS), rng)
    text = " ".join(p for p in [greeting, *parts, closing] if p)
    return text, urgency, category


def near_duplicate(text: str, rng: random.Random) -> str:
    """A resubmitted ticket: same words, small edits (case, punctuation, a word added)."""
    edits = [
        lambda t: t.replace(".", "!", 1),
        lambda t: t + " Thanks in advance.",
        lambda t: t.lower(),
        lambda t: "Hello again, " + t,
        lambda t: t.replace(",", "", 1) + " Any update?",
    ]
    return rng.choice(edits)(text)


def generate(rows: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    clean = [make_ticket(rng) for _ in range(rows)]
    lines = [json.dumps(record(*t), ensure_ascii=False) for t in clean]

    def insert(line: str) -> None:
        lines.insert(rng.randrange(len(lines) + 1), line)

    n = max(1, rows // 100)  # defect counts scale with the data set
    for t in rng.sample(clean, 3 * n):  # exact duplicates (re-exported rows)
        insert(json.dumps(record(*t), ensure_ascii=False))
    for t in rng.sample(clean, 3 * n):  # near duplicates (customer wrote again)
        insert(json.dumps(record(near_duplicate(t[0], rng), t[1], t[2]), ensure_ascii=False))
    for text, urgency, category in rng.sample(clean, n):  # conflicting labels for one ticket
        other = rng.choice([u for u in URGENCIES if u != urgency])
        insert(json.dumps(record(text, other, category), ensure_ascii=False))
    for _ in range(max(1, n // 3)):  # missing assistant turn
        text, _, _ = make_ticket(rng)
        insert(json.dumps({"messages": record(text, "low", "billing")["messages"][:2]}))
    for _ in range(max(1, n // 3)):  # empty assistant answer
        rec = record(*make_ticket(rng))
        rec["messages"][2]["content"] = ""
        insert(json.dumps(rec))
    for _ in range(max(1, n // 3)):  # unknown role from a helpdesk export
        rec = record(*make_ticket(rng))
        rec["messages"][1]["role"] = "customer"
        insert(json.dumps(rec))
    for _ in range(max(1, n // 3)):  # over-long ticket: a pasted log dump
        text, urgency, category = make_ticket(rng)
        log = " ".join(
            f"[2026-11-0{rng.randint(1, 9)} ERROR] request {rng.randint(1, 10**6)} failed"
            for _ in range(400)
        )
        insert(json.dumps(record(text + " Here is the log: " + log, urgency, category)))
    for _ in range(max(1, n // 3)):  # label outside the declared set
        text, urgency, _ = make_ticket(rng)
        insert(json.dumps(record(text, urgency, "sales")))
    for _ in range(max(1, n // 5)):  # malformed JSON: a truncated export line
        line = json.dumps(record(*make_ticket(rng)))
        insert(line[: len(line) // 2])
    return lines


def generate_test(rows: int, seed: int) -> list[str]:
    """A clean, curated-like test set from its own random stream (no defects injected)."""
    rng = random.Random(f"test-{seed}")
    return [json.dumps(record(*make_ticket(rng)), ensure_ascii=False) for _ in range(rows)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1200, help="clean tickets before defects")
    parser.add_argument("--seed", type=int, default=20261122)
    parser.add_argument("--out", type=Path, default=Path("data/raw/tickets.jsonl"))
    parser.add_argument("--test-rows", type=int, default=120)
    parser.add_argument("--test-out", type=Path, default=Path("data/eval/tickets_test.jsonl"))
    args = parser.parse_args()
    for path, lines in (
        (args.out, generate(args.rows, args.seed)),
        (args.test_out, generate_test(args.test_rows, args.seed)),
    ):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"wrote {len(lines)} lines to {path}")


if __name__ == "__main__":
    main()
