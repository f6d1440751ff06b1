#!/usr/bin/env python3
"""Regenerate the Parquet fixtures next to this file with `datasets` (`Dataset.from_list(rows).to_parquet`):
string, int64, double, bool and list<struct<role, content>> columns, Snappy compression.
Run with the pinned venv: /work/venv/bin/python crates/data/tests/data/make_parquet.py"""
import os

from datasets import Dataset

HERE = os.path.dirname(os.path.abspath(__file__))


def msg(role, content):
    return {"role": role, "content": content}


def write(name, rows):
    Dataset.from_list(rows).to_parquet(os.path.join(HERE, name))


write("preference.parquet", [
    {"prompt": "Q: 17+25=", "chosen": " 42", "rejected": " 43", "margin": 1.5, "id": 7, "reviewed": True},
    {"prompt": "Q: 10+11=", "chosen": " 21", "rejected": " 12", "margin": None, "id": 8, "reviewed": False},
])
write("conversational_preference.parquet", [
    {"prompt": [msg("system", "Be brief."), msg("user", "2+2?")],
     "chosen": [msg("assistant", "4")], "rejected": [msg("assistant", "5")]},
])
write("messages.parquet", [
    {"messages": [msg("user", "Hi"), msg("assistant", "Hello!")]},
    {"messages": [msg("user", "Ünïcödé ✓"), msg("assistant", "ok")]},
])
write("unpaired.parquet", [
    {"prompt": "Q: 1+1=", "completion": " 2", "label": True},
    {"prompt": "Q: 1+1=", "completion": " 3", "label": False},
])
write("rating.parquet", [
    {"prompt": "Q: 1+1=", "completion": " 2", "score": 5, "score_min": 1, "score_max": 5},
    {"prompt": "Q: 1+1=", "completion": " 3", "score": 1.5, "score_min": 1, "score_max": 5},
])
write("bad_column.parquet", [
    {"prompt": "Q: 1+1=", "chosen": " 2", "rejected": " 3"},
    {"prompt": "Q: 2+2=", "chosen": None, "rejected": " 5"},
])
write("bad_type.parquet", [
    {"prompt": "Q: 1+1=", "chosen": 2, "rejected": 3},
])
