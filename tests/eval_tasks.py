"""A local lm-eval multiple-choice task (YAML + jsonl, Italian questions), written into a
folder for --include-path: no dataset download."""
from __future__ import annotations

import json
from pathlib import Path

TASK = "anita_test_mc"
QUESTIONS = [
    ("Qual è la capitale d'Italia?", ["Roma", "Milano", "Napoli", "Torino"], 0),
    ("Di che colore è il cielo sereno?", ["verde", "azzurro", "rosso"], 1),
    ("Quante zampe ha un gatto?", ["due", "tre", "quattro", "sei"], 2),
    ("Qual è il contrario di caldo?", ["freddo", "alto"], 0),
    ("In quale mare si trova la Sicilia?", ["nel Mar Baltico", "nel Mar Mediterraneo",
                                            "nell'Oceano Indiano"], 1),
    ("Chi scrisse la Divina Commedia?", ["Manzoni", "Leopardi", "Dante Alighieri"], 2),
]


def write_task(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}, ensure_ascii=False)
                            + "\n" for q, c, a in QUESTIONS), encoding="utf-8")
    (folder / f"{TASK}.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Domanda: {{{{question}}}}\\nRisposta:"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""", encoding="utf-8")
    return folder
