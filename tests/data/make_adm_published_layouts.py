"""Writes adm_published_layouts.json from a listing of guided-diffusion's released state dicts.

    python tests/data/make_adm_published_layouts.py /path/to/adm_unet_state_dict_keys.txt

The listing has, per layout, a header with the parameter and key counts, then the keys with their
shapes (for some layouts only), then one line per block naming its modules, channels and heads, and
the attention class. The JSON keeps all of it so that the tests need nothing outside the repository.
"""

import ast
import json
import re
import sys
from pathlib import Path

HEADER = re.compile(r"^##### (\S+): params=([\d,]+) keys=(\d+) attention_resolutions\(ds\)=\(([^)]*)\) channel_mult=\(([^)]*)\)")
KEY = re.compile(r"^  ([\w.]+)\s+\(([\d, ]*)\)$")
BLOCK = re.compile(r"^  (input_blocks|output_blocks|middle)(?: (\d+))? (\[.*\])$")
LAYER = re.compile(r"^(\w+)(?:\(ch=(\w+)->(\w+),heads=(\w+)\))?$")


def _number(text):
    return None if text == "None" else int(text)


def parse(text):
    layouts = {}
    current = None
    for line in text.splitlines():
        if m := HEADER.match(line):
            current = layouts[m.group(1)] = {
                "params": int(m.group(2).replace(",", "")),
                "key_count": int(m.group(3)),
                "attention_ds": [int(v) for v in m.group(4).split(",") if v.strip()],
                "channel_mult": [int(v) for v in m.group(5).split(",") if v.strip()],
                "keys": {},
                "blocks": [],
                "attention_impl": None,
            }
        elif m := KEY.match(line):
            current["keys"][m.group(1)] = [int(v) for v in m.group(2).split(",") if v.strip()]
        elif m := BLOCK.match(line):
            layers = []
            for entry in ast.literal_eval(m.group(3)):
                kind, cin, cout, heads = LAYER.match(entry).groups()
                layers.append({"type": kind, "in": _number(cin or "None"), "out": _number(cout or "None"),
                               "heads": _number(heads or "None")})
            current["blocks"].append({"section": m.group(1), "index": _number(m.group(2) or "None"), "layers": layers})
        elif line.startswith("  attention impl: "):
            current["attention_impl"] = line.split(":", 1)[1].strip()
        elif line.strip():
            raise ValueError(f"unparsed line: {line!r}")
    for layout in layouts.values():
        if not layout["keys"]:
            layout["keys"] = None  # the listing gives only the block summary for this layout
    return layouts


if __name__ == "__main__":
    source = Path(sys.argv[1])
    layouts = parse(source.read_text())
    out = Path(__file__).with_name("adm_published_layouts.json")
    text = json.dumps({"source": source.name, "layouts": layouts}, indent=1)
    # One key or layer per line: collapse the innermost lists and objects.
    text = re.sub(r"\[[\d,\s]*\]|\{[^{}\[\]]*\}", lambda m: " ".join(m.group(0).split()), text)
    out.write_text(text + "\n")
    print(f"wrote {out}: " + ", ".join(f"{k} ({len(v['keys'] or {})} keys)" for k, v in layouts.items()))
