"""JSON writing shared by the fixture scripts: indented objects, but lists of scalars on one line
so id/label arrays stay readable and the fixtures stay small."""
import json
import os


def _is_scalar(x):
    return x is None or isinstance(x, (bool, int, float, str))


def _dump(obj, indent, level):
    pad = " " * (indent * (level + 1))
    end = " " * (indent * level)
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{pad}{json.dumps(str(k), ensure_ascii=False)}: {_dump(v, indent, level + 1)}"
                 for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + end + "}"
    if isinstance(obj, (list, tuple)):
        if all(_is_scalar(x) for x in obj):
            return json.dumps(list(obj), ensure_ascii=False)
        return "[\n" + ",\n".join(pad + _dump(x, indent, level + 1) for x in obj) + "\n" + end + "]"
    return json.dumps(obj, ensure_ascii=False, allow_nan=False)


def write_json(path, obj, indent=1):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    text = _dump(obj, indent, 0)
    assert json.loads(text) == json.loads(json.dumps(obj)), path  # formatting must not change data
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")
