"""Builds the bundled sample datasets (JSONL, Italian and English) from the
hand-written tables in sample_text.py.

    python -m anita_core.assets.build_data [--out DIR]

Deterministic: the same script always writes byte-identical files (a test
rebuilds them and compares with the shipped copies).
"""
from __future__ import annotations

import argparse
import json
import os
import random
from typing import Dict, List

from anita_core.assets import DATA_DIR, SAMPLE_FILES
from anita_core.assets import sample_text as T

ORDINALS_IT = ["primo", "secondo", "terzo", "quarto", "quinto", "sesto", "settimo", "ottavo",
               "nono", "decimo", "undicesimo", "dodicesimo"]


def day_with_article(day: str) -> str:
    """Italian day with its article: every day is masculine except domenica."""
    return ("la " if day == "domenica" else "il ") + day


def _system(rng: random.Random, lang: str, probability: float) -> str:
    pool = T.SYSTEM_PROMPTS_IT if lang == "it" else T.SYSTEM_PROMPTS_EN
    return rng.choice(pool) if rng.random() < probability else ""


def _small_sums(rng: random.Random, count: int):
    """``count`` distinct (a, b) with a + b <= 20, so the sum has an Italian/English word."""
    pairs = sorted({(a, b) for a in range(1, 11) for b in range(1, 11)})
    return rng.sample(pairs, count)


# ---------------------------------------------------------------- instruction rows
def instruction_rows(rng: random.Random) -> List[Dict[str, str]]:
    rows = []

    def add(lang, instruction, input_text, output):
        rows.append({"system": _system(rng, lang, 0.25), "instruction": instruction,
                     "input": input_text, "output": output})

    for lang, instruction, input_text, output in T.INSTRUCTIONS:
        add(lang, instruction, input_text, output)
    for region, capital in T.REGIONS:
        add("it", f"Qual è il capoluogo della regione {region}?", "",
            f"Il capoluogo della regione {region} è {capital}.")
        add("en", f"What is the capital of the Italian region {region}?", "",
            f"The capital of {region} is {capital}.")
    words = list(T.WORDS)
    rng.shuffle(words)
    for it, en in words[:20]:
        add("it", "Traduci la parola in inglese.", it, en)
    for it, en in words[20:]:
        add("en", "Translate the word into Italian.", en, it)
    for a, b in _small_sums(rng, 15):
        add("it", f"Quanto fa {T.NUMBERS_IT[a]} più {T.NUMBERS_IT[b]}?", "",
            f"{T.NUMBERS_IT[a].capitalize()} più {T.NUMBERS_IT[b]} fa {T.NUMBERS_IT[a + b]}.")
    for a, b in _small_sums(rng, 15):
        add("en", f"What is {T.NUMBERS_EN[a]} plus {T.NUMBERS_EN[b]}?", "",
            f"{T.NUMBERS_EN[a].capitalize()} plus {T.NUMBERS_EN[b]} is {T.NUMBERS_EN[a + b]}.")
    for it_a, it_b, en_a, en_b in T.OPPOSITES:
        add("it", "Scrivi il contrario dell'aggettivo.", it_a, it_b)
    for it_a, it_b, en_a, en_b in T.OPPOSITES[::2]:
        add("en", "Give the opposite of the adjective.", en_a, en_b)
    for singular, plural in T.PLURALS:
        add("it", "Scrivi il plurale del nome.", singular, plural)
    for i, day in enumerate(T.DAYS_IT):
        after = T.DAYS_IT[(i + 1) % 7]
        add("it", f"Quale giorno viene dopo {day_with_article(day)}?", "",
            f"Dopo {day_with_article(day)} viene {day_with_article(after)}.")
        add("en", f"Which day comes after {T.DAYS_EN[i]}?", "",
            f"After {T.DAYS_EN[i]} comes {T.DAYS_EN[(i + 1) % 7]}.")
    for i, month in enumerate(T.MONTHS_IT):
        add("it", f"Quale mese viene dopo {month}?", "",
            f"Dopo {month} viene {T.MONTHS_IT[(i + 1) % 12]}.")
    rng.shuffle(rows)
    return rows


# ---------------------------------------------------------------- chat rows
def chat_rows(rng: random.Random) -> List[Dict]:
    rows = []

    def add(lang, turns):
        messages = []
        system = _system(rng, lang, 0.3)
        if system:
            messages.append({"role": "system", "content": system})
        messages += [{"role": role, "content": content} for role, content in turns]
        rows.append({"messages": messages})

    for turns in T.CONVERSATIONS:
        rows.append({"messages": [{"role": r, "content": c} for r, c in turns]})
    for region, capital in T.REGIONS:
        turns = [("user", f"Qual è il capoluogo della regione {region}?"),
                 ("assistant", f"Il capoluogo della regione {region} è {capital}.")]
        if rng.random() < 0.5:
            other_region, other_capital = rng.choice(T.REGIONS)
            turns += [("user", f"E {other_capital}?"),
                      ("assistant", f"{other_capital} è il capoluogo della regione {other_region}.")]
        add("it", turns)
    for _ in range(25):
        (it, en), (it2, en2) = rng.sample(T.WORDS, 2)
        add("it", [("user", f"Come si dice «{it}» in inglese?"),
                   ("assistant", f"In inglese «{it}» si dice «{en}»."),
                   ("user", f"E «{it2}»?"),
                   ("assistant", f"«{it2}» si dice «{en2}».")])
    for a, b in _small_sums(rng, 20):
        c = rng.randint(1, 9)
        add("en", [("user", f"What is {a} plus {b}?"),
                   ("assistant", f"{a} plus {b} is {a + b}."),
                   ("user", f"And if I add {c} more?"),
                   ("assistant", f"Then the total is {a + b + c}.")])
    for i, day in enumerate(T.DAYS_IT):
        add("it", [("user", f"Che giorno viene dopo {day_with_article(day)}?"),
                   ("assistant", f"Dopo {day_with_article(day)} viene "
                                 f"{day_with_article(T.DAYS_IT[(i + 1) % 7])}.")])
        add("en", [("user", f"What day comes before {T.DAYS_EN[i]}?"),
                   ("assistant", f"{T.DAYS_EN[i - 1]} comes before {T.DAYS_EN[i]}.")])
    for it_a, it_b, en_a, en_b in T.OPPOSITES:
        add("it", [("user", f"Qual è il contrario di «{it_a}»?"),
                   ("assistant", f"Il contrario di «{it_a}» è «{it_b}»."),
                   ("user", "E in inglese?"),
                   ("assistant", f"In inglese «{it_a}» si dice «{en_a}» e il contrario è «{en_b}».")])
    for i, month in enumerate(T.MONTHS_IT):
        add("it", [("user", f"Che mese viene dopo {month}?"),
                   ("assistant", f"Dopo {month} viene {T.MONTHS_IT[(i + 1) % 12]}.")])
    rng.shuffle(rows)
    return rows


# ---------------------------------------------------------------- raw Italian text rows
def text_rows(rng: random.Random) -> List[Dict[str, str]]:
    texts = list(T.PARAGRAPHS)
    for region, capital in T.REGIONS:
        texts.append(f"{capital} è il capoluogo della regione {region}. Chi visita {capital} "
                     f"scopre una parte importante della storia del {region}."
                     if region in ("Piemonte", "Veneto", "Lazio", "Molise") else
                     f"{capital} è il capoluogo della regione {region}.")
    for i, day in enumerate(T.DAYS_IT):
        texts.append(f"{day_with_article(day).capitalize()} è il {ORDINALS_IT[i]} giorno della "
                     f"settimana.")
    for i, month in enumerate(T.MONTHS_IT):
        after = f" Dopo {month} viene {T.MONTHS_IT[i + 1]}." if i < 11 else " Poi ricomincia l'anno."
        texts.append(f"{month.capitalize()} è il {ORDINALS_IT[i]} mese dell'anno.{after}")
    for it_a, it_b, _, _ in T.OPPOSITES:
        texts.append(f"Il contrario di «{it_a}» è «{it_b}».")
    for singular, plural in T.PLURALS:
        texts.append(f"Il plurale di «{singular}» è «{plural}».")
    sums = _small_sums(rng, 45)
    for k in range(0, 45, 3):
        texts.append(" ".join(f"{T.NUMBERS_IT[a].capitalize()} più {T.NUMBERS_IT[b]} fa "
                              f"{T.NUMBERS_IT[a + b]}." for a, b in sums[k:k + 3]))
    for k in range(0, len(T.WORDS), 2):
        texts.append(" ".join(f"La parola «{it}» in inglese si dice «{en}»."
                              for it, en in T.WORDS[k:k + 2]))
    rng.shuffle(texts)
    return [{"text": t} for t in texts]


# ---------------------------------------------------------------- DPO pairs as strings
def dpo_pair_rows(rng: random.Random) -> List[Dict[str, str]]:
    rows = []
    unhelpful_it = ["Non lo so.", "Cercalo da solo.", "Non ho tempo per queste domande."]
    unhelpful_en = ["I don't know.", "Look it up yourself.", "No idea."]

    def add(prompt, chosen, rejected, source):
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "source": source})

    for region, capital in T.REGIONS:
        wrong = rng.choice([c for r, c in T.REGIONS if c != capital])
        add(f"Qual è il capoluogo della regione {region}?",
            f"Il capoluogo della regione {region} è {capital}.",
            f"Il capoluogo della regione {region} è {wrong}."
            if rng.random() < 0.7 else rng.choice(unhelpful_it), "anita-facts")
        add(f"What is the capital of the Italian region {region}?",
            f"The capital of {region} is {capital}.",
            f"The capital of {region} is {wrong}." if rng.random() < 0.7 else rng.choice(unhelpful_en),
            "anita-facts")
    for a, b in _small_sums(rng, 30):
        off = rng.choice([-2, -1, 1, 2])
        if rng.random() < 0.5:
            add(f"Quanto fa {a} più {b}?", f"{a} più {b} fa {a + b}.", f"{a} più {b} fa {a + b + off}.",
                "anita-math")
        else:
            add(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.", f"{a} plus {b} is {a + b + off}.",
                "anita-math")
    for it, en in T.WORDS[:30]:
        wrong = rng.choice([e for i, e in T.WORDS if e != en])
        if rng.random() < 0.5:
            add(f"Come si dice «{it}» in inglese?", f"«{it}» in inglese si dice «{en}».",
                f"«{it}» in inglese si dice «{wrong}».", "anita-translate")
        else:
            add(f"How do you say «{en}» in Italian?", f"In Italian, «{en}» is «{it}».",
                rng.choice(unhelpful_en), "anita-translate")
    for i, day in enumerate(T.DAYS_IT):
        add(f"Quale giorno viene dopo {day_with_article(day)}?",
            f"Dopo {day_with_article(day)} viene {day_with_article(T.DAYS_IT[(i + 1) % 7])}.",
            f"Dopo {day_with_article(day)} viene {day_with_article(T.DAYS_IT[(i + 3) % 7])}.",
            "anita-facts")
    for it_a, it_b, en_a, en_b in T.OPPOSITES:
        add(f"Qual è il contrario di «{it_a}»?", f"Il contrario di «{it_a}» è «{it_b}».",
            f"Il contrario di «{it_a}» è «{it_a}».", "anita-facts")
    for lang, instruction, input_text, output in T.INSTRUCTIONS:
        prompt = instruction if not input_text else f"{instruction}\n\n{input_text}"
        add(prompt, output, rng.choice(unhelpful_it if lang == "it" else unhelpful_en), "anita-instruct")
    rng.shuffle(rows)
    return rows


# ---------------------------------------------------------------- DPO pairs as message lists
def dpo_message_rows(rng: random.Random) -> List[Dict]:
    rows = []

    def add(prompt_turns, chosen, rejected, source, lang):
        messages = []
        system = _system(rng, lang, 0.3)
        if system:
            messages.append({"role": "system", "content": system})
        messages += [{"role": r, "content": c} for r, c in prompt_turns]
        rows.append({
            "source": source,
            "prompt": prompt_turns[-1][1],
            "chosen": messages + [{"role": "assistant", "content": chosen}],
            "rejected": messages + [{"role": "assistant", "content": rejected}],
        })

    by_lang = {"it": [x for x in T.INSTRUCTIONS if x[0] == "it"],
               "en": [x for x in T.INSTRUCTIONS if x[0] == "en"]}
    for lang, instruction, input_text, output in T.INSTRUCTIONS:
        off_topic = rng.choice([x[3] for x in by_lang[lang] if x[3] != output])
        prompt = instruction if not input_text else f"{instruction}\n\n{input_text}"
        add([("user", prompt)], output, off_topic, "anita-instruct", lang)
    for region, capital in T.REGIONS:
        other_region, other_capital = rng.choice([x for x in T.REGIONS if x[0] != region])
        wrong = rng.choice([c for r, c in T.REGIONS if c != capital])
        add([("user", f"Qual è il capoluogo della regione {other_region}?"),
             ("assistant", f"Il capoluogo della regione {other_region} è {other_capital}."),
             ("user", f"E quello della regione {region}?")],
            f"Il capoluogo della regione {region} è {capital}.",
            f"Il capoluogo della regione {region} è {wrong}.", "anita-facts", "it")
        add([("user", f"Which city is the capital of {region}?")],
            f"{capital} is the capital of {region}.", f"{wrong} is the capital of {region}.",
            "anita-facts", "en")
    for it, en in T.WORDS:
        wrong_it = rng.choice([i for i, e in T.WORDS if i != it])
        add([("user", f"Traduci in italiano: «{en}».")], f"«{en}» in italiano si dice «{it}».",
            f"«{en}» in italiano si dice «{wrong_it}».", "anita-translate", "it")
    for i, month in enumerate(T.MONTHS_IT):
        add([("user", f"Che mese viene dopo {month}?")],
            f"Dopo {month} viene {T.MONTHS_IT[(i + 1) % 12]}.",
            f"Dopo {month} viene {T.MONTHS_IT[(i + 5) % 12]}.", "anita-facts", "it")
    for turns in T.CONVERSATIONS:
        # the conversation's own turns (system prompt included) are the prompt
        *prompt_turns, (_, answer) = turns
        messages = [{"role": r, "content": c} for r, c in prompt_turns]
        rows.append({
            "source": "anita-chat",
            "prompt": prompt_turns[-1][1],
            "chosen": messages + [{"role": "assistant", "content": answer}],
            "rejected": messages + [{"role": "assistant",
                                     "content": "Non saprei, chiedi a qualcun altro."}],
        })
    for lang, prompt, rude, polite in T.RUDE_PAIRS:
        # toxic-dpo rows prefer the rude answer: the recipe filters this source out
        add([("user", prompt)], rude, polite, "toxic-dpo", lang)
    rng.shuffle(rows)
    return rows


BUILDERS = {
    "instruction": instruction_rows,
    "chat": chat_rows,
    "text": text_rows,
    "dpo": dpo_pair_rows,
    "dpo_messages": dpo_message_rows,
}


def write_jsonl(path: str, rows: List[Dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def build(out_dir: str = DATA_DIR) -> Dict[str, str]:
    """Writes every sample dataset into ``out_dir``; returns shape -> path."""
    os.makedirs(out_dir, exist_ok=True)
    written = {}
    for seed, (shape, builder) in enumerate(BUILDERS.items()):
        rows = builder(random.Random(1000 + seed))
        path = os.path.join(out_dir, SAMPLE_FILES[shape])
        write_jsonl(path, rows)
        written[shape] = path
    return written


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DATA_DIR, help="output folder (default: the bundled data/)")
    args = parser.parse_args(argv)
    for shape, path in build(args.out).items():
        with open(path, encoding="utf-8") as f:
            n = sum(1 for _ in f)
        print(f"{shape:14s} {n:4d} rows  {os.path.getsize(path) / 1024:6.1f} KB  {path}")


if __name__ == "__main__":
    main()
