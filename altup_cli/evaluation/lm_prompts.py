"""The prompt functions of the packaged lm-eval tasks that a Jinja template cannot say,
as lm-eval 0.4.13's own task files define them (hellaswag/utils.py,
winogrande/preprocess_winogrande.py, super_glue/copa/utils.py), so that the prompts, and
the numbers, are the stock tasks'. The YAMLs in `lm_tasks/` name them with `!function`.
"""

from __future__ import annotations

import re
from typing import Any


def _hellaswag_clean(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")  # WikiHow artefacts
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_process_docs(dataset: Any) -> Any:
    def process(doc: dict[str, Any]) -> dict[str, Any]:
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {
            "query": _hellaswag_clean(doc["activity_label"] + ": " + ctx),
            "choices": [_hellaswag_clean(ending) for ending in doc["endings"]],
            "gold": int(doc["label"]),
        }

    return dataset.map(process)


def winogrande_doc_to_text(doc: dict[str, Any]) -> int:
    """The index of the right context: WinoGrande scores one continuation after each of
    two contexts (the sentence up to the blank, filled with either option)."""
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_doc_to_target(doc: dict[str, Any]) -> str:
    return doc["sentence"][doc["sentence"].index("_") + 1 :].strip()


def winogrande_doc_to_choice(doc: dict[str, Any]) -> list[str]:
    blank = doc["sentence"].index("_")
    return [doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"])]


def _copa_choice(choice: str) -> str:
    return " " + choice[0].lower() + choice[1:]


def copa_doc_to_text(doc: dict[str, Any]) -> str:
    connector = {"cause": "because", "effect": "therefore"}[doc["question"]]
    return doc["premise"].strip()[:-1] + f" {connector}"  # the premise without its period


def copa_doc_to_target(doc: dict[str, Any]) -> str:
    return _copa_choice(doc["choice1"] if doc["label"] == 0 else doc["choice2"])


def copa_doc_to_choice(doc: dict[str, Any]) -> list[str]:
    return [_copa_choice(doc["choice1"]), _copa_choice(doc["choice2"])]
