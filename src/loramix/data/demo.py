"""Offline demo data: small synthetic files in the eight sources' original schemas.

Every text is generated here from word lists with a seeded RNG (no dataset text is copied), so the
demo and the tests run anywhere. Each source gets its own style so per-source metrics differ.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from loramix.files import write_atomic

ROWS_PER_SOURCE = 120
VERSION = 1  # bump when the generator changes, so cached files are regenerated

NAMES = ["Mira", "Tom", "Ada", "Leo", "Nina", "Sam", "Iris", "Ben", "Zoe", "Max"]
ANIMALS = ["cat", "dog", "bird", "fox", "rabbit", "turtle", "frog", "bear"]
PLACES = ["the park", "the river", "the old mill", "the garden", "the harbor", "the hill", "the market"]
ADJ = ["small", "bright", "quiet", "red", "happy", "old", "brave", "curious", "tired", "shiny"]
TOPICS = ["markets", "elections", "football", "software", "climate", "energy", "health", "space"]
ORGS = ["the council", "a startup", "the league", "the ministry", "a research team", "the union"]
VERBS = ["announced", "reported", "rejected", "approved", "launched", "delayed", "expanded"]
FOODS = ["pizza", "noodles", "tacos", "coffee", "salad", "burgers", "soup", "pastries"]
FILMS = ["the sequel", "this thriller", "the comedy", "this drama", "the remake", "the documentary"]


def _news_sentence(r: random.Random) -> str:
    return (f"{r.choice(ORGS).capitalize()} {r.choice(VERBS)} a plan on {r.choice(TOPICS)} "
            f"on {r.choice(['Monday', 'Tuesday', 'Friday'])}, officials said.")


def _story(r: random.Random) -> str:
    name, animal, place = r.choice(NAMES), r.choice(ANIMALS), r.choice(PLACES)
    lines = [f"Once upon a time, {name} found a {r.choice(ADJ)} {animal} near {place}."]
    for _ in range(r.randint(2, 6)):
        lines.append(f"The {animal} was {r.choice(ADJ)}, so {name} gave it some {r.choice(FOODS)}.")
    lines.append(f"From that day on, {name} and the {animal} were best friends.")
    return " ".join(lines)


def _review(r: random.Random, subject: str) -> tuple[str, int]:
    stars = r.randint(0, 4)
    mood = ["awful", "poor", "okay", "good", "excellent"][stars]
    parts = [f"I tried {subject} last week and it was {mood}."]
    parts += [f"The {r.choice(ADJ)} details felt {mood} to me." for _ in range(r.randint(1, 5))]
    return " ".join(parts), stars


def _rows(source: str, r: random.Random) -> list[dict]:
    rows = []
    for i in range(ROWS_PER_SOURCE):
        if source == "wikitext":
            if i % 10 == 0:
                rows.append({"text": ""})  # the real split has blank rows, which must be skipped
            elif i % 10 == 1:
                rows.append({"text": f" = {r.choice(PLACES).title()} = \n"})
            else:
                facts = (f"{r.choice(PLACES).capitalize()} is a {r.choice(ADJ)} place known for {r.choice(TOPICS)} ." for _ in range(r.randint(2, 6)))
                rows.append({"text": " " + " ".join(facts) + " \n"})
        elif source == "tinystories":
            rows.append({"text": _story(r)})
        elif source == "ag_news":
            rows.append({"text": f"{r.choice(TOPICS).title()} update: " + _news_sentence(r), "label": r.randint(0, 3)})
        elif source == "yelp_review_full":
            text, stars = _review(r, r.choice(FOODS))
            rows.append({"label": stars, "text": text})
        elif source == "imdb":
            text, stars = _review(r, r.choice(FILMS))
            rows.append({"text": text.replace(". ", ". <br /><br />", 1), "label": int(stars >= 3)})
        elif source == "cnn_dailymail":
            body = " ".join(_news_sentence(r) for _ in range(r.randint(6, 14)))
            rows.append({"article": body, "highlights": _news_sentence(r) + "\n" + _news_sentence(r), "id": f"demo{i:05d}"})
        elif source == "xsum":
            body = " ".join(_news_sentence(r) for _ in range(r.randint(3, 8)))
            rows.append({"document": body, "summary": _news_sentence(r), "id": str(i)})
        elif source == "squad":
            name, place = r.choice(NAMES), r.choice(PLACES)
            context = f"{name} walked to {place} every morning. " + _story(r)
            start = context.index(place)
            rows.append({
                "id": f"q{i:05d}", "title": place.title(), "context": context,
                "question": f"Where did {name} walk every morning?",
                "answers": {"text": [place], "answer_start": [start]},
            })
    return rows


DEMO_SOURCES = ["wikitext", "tinystories", "ag_news", "yelp_review_full", "cnn_dailymail", "xsum", "squad", "imdb"]


def write_demo_data(folder: Path, seed: int = 0) -> None:
    """Write `<source>.jsonl` for the eight sources into `folder` (deterministic for a seed)."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, source in enumerate(DEMO_SOURCES):
        rows = _rows(source, random.Random(seed * 1000 + k))
        write_atomic(folder / f"{source}.jsonl", "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def ensure_demo_data(cache_dir: str) -> Path:
    """The generated demo folder under the cache dir, written on first use."""
    folder = Path(cache_dir).expanduser() / f"demo-data-v{VERSION}"
    if not all((folder / f"{s}.jsonl").is_file() for s in DEMO_SOURCES):
        write_demo_data(folder)
    return folder
