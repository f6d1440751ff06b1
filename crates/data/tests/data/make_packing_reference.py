#!/usr/bin/env python3
"""Record TRL 1.16's `pack_dataset` (bfd and wrapped) on deterministic inputs -> packing_reference.json.
Run with the pinned venv: /work/venv/bin/python crates/data/tests/data/make_packing_reference.py"""
import json
import os
import random

from datasets import Dataset
from trl import pack_dataset

HERE = os.path.dirname(os.path.abspath(__file__))


def case(name, input_ids, seq_length, strategy):
    # Labels are rebuilt by the Rust test with the same rule.
    labels = [[t if (i + j) % 3 else -100 for j, t in enumerate(ids)] for i, ids in enumerate(input_ids)]
    ds = Dataset.from_dict({"input_ids": input_ids, "labels": labels})
    packed = pack_dataset(ds, seq_length, strategy)
    rows = packed.to_dict()
    return {
        "name": name,
        "seq_length": seq_length,
        "strategy": strategy,
        "input_ids": input_ids,
        "packed_input_ids": rows["input_ids"],
        "packed_labels": rows["labels"],
        "seq_lengths": rows.get("seq_lengths"),
    }


rng = random.Random(1234)
docstring = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10], [11]]
# 2100 examples: several `map` batches of 1000, many equal lengths (ties), some longer than seq_length, some empty.
many = [[rng.randint(4, 99) for _ in range(rng.choice([0, 1, 2, 3, 5, 8, 13, 20, 31, 40]))] for _ in range(2100)]
cases = [
    case("docstring_bfd", docstring, 4, "bfd"),
    case("docstring_wrapped", docstring, 4, "wrapped"),
    case("many_bfd", many, 32, "bfd"),
    case("many_wrapped", many[:100], 32, "wrapped"),
]
with open(os.path.join(HERE, "packing_reference.json"), "w") as f:
    json.dump({"trl": __import__("trl").__version__, "cases": cases}, f, separators=(",", ":"))
