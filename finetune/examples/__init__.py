"""Example datasets shipped with the app; the Fine-tune tab offers them with "Load example".

``invented-facts.jsonl`` holds 30 questions about things that do not exist, each answered by one made-up
word ("What is the capital of the planet Zorblax?" -> "Quillmoor."). Every fact in it is invented for
this example, so no base model can know them: the answers show plainly whether an adapter taught the
model something. ``smollm2-135m`` answers none of them before training and all of them after a run of
the *teach facts (smollm2-135m)* preset (``tests/test_qlora_teaches.py`` measures both).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

FOLDER = Path(__file__).resolve().parent


@dataclasses.dataclass(frozen=True)
class ExampleDataset:
    """A dataset file in this folder and the run settings it was made for.

    Attributes:
        label: what the tab's button says.
        file: the JSONL file's name in this folder.
        base_model: the catalog id it was tuned for.
        adapter_name: the adapter folder a run saves.
        preset: a ``finetune.config.PRESETS`` name.
        quantization: the base model's quantization while training.
    """

    label: str
    file: str
    base_model: str
    adapter_name: str
    preset: str
    quantization: str = "nf4"

    @property
    def path(self) -> Path:
        return FOLDER / self.file

    def questions(self) -> list[tuple[str, str]]:
        """(question, expected answer without its final full stop) for each row, in file order."""
        pairs = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                pairs.append((row["instruction"], row["output"].strip().rstrip(".")))
        return pairs


INVENTED_FACTS = ExampleDataset(label="invented facts (smollm2-135m)", file="invented-facts.jsonl",
                                base_model="smollm2-135m", adapter_name="invented-facts",
                                preset="teach facts (smollm2-135m)")


def is_right(reply: str, answer: str) -> bool:
    """Whether a reply gives the expected answer: the answer appears in it, ignoring case."""
    return answer.lower() in reply.lower()
