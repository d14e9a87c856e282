"""In-memory datasets for the local lm-eval tasks (``custom_dataset: !function data.NAME``): no files, no hub."""

from __future__ import annotations

import datasets

TEXT = ("The quick brown fox jumps over the lazy dog. Question: what is two plus two? Answer: four. "
        "The following are multiple choice questions (with answers) about algebra.")


def multiple_choice(**_: object) -> datasets.DatasetDict:
    rows = [
        {"question": "Question: what is two plus two?\nAnswer:", "choices": ["four", "two", "one", "three"], "answer": 0},
        {"question": "The quick brown fox jumps over the", "choices": ["lazy dog.", "fox.", "answer"], "answer": 0},
        {"question": "A. one\nB. two\nC. three\nD. four\nAnswer:", "choices": ["A", "B", "C", "D"], "answer": 3},
    ]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def rolling(**_: object) -> datasets.DatasetDict:
    rows = [{"text": TEXT}, {"text": "Answer: four."}, {"text": " ".join([TEXT] * 3)}]  # the last one rolls
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def generation(**_: object) -> datasets.DatasetDict:
    rows = [{"prompt": "The quick", "target": " brown fox"}, {"prompt": "Question: what is", "target": " two"}]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
