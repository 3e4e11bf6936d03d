#!/usr/bin/env python3
"""Writes the fuzzers' seed corpora from the repository's fixtures:

    python3 fuzz/seed.py        # -> fuzz/corpus/{frame,envelope,msgpack,refs}/

envelope: every captured pickle frame payload (Python 3 and Python 2
clients and servers, fixtures/zeo5-*); msgpack: every captured msgpack
frame payload (a 4-item array, 0x94, in the M5 captures); frame: the
same frames with their length prefixes, several per file; refs: every
record of fixtures/refs/.
Stdlib only. The corpus directories are not committed (they are derived).
"""
import hashlib
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(__file__).resolve().parent / "corpus"


def put(target, data):
    d = OUT / target
    d.mkdir(parents=True, exist_ok=True)
    (d / hashlib.sha1(data).hexdigest()).write_bytes(data)


def main():
    n = {"frame": 0, "envelope": 0, "msgpack": 0, "refs": 0}
    for folder in ("zeo5-py3", "zeo5-py2"):
        for f in sorted((ROOT / "fixtures" / folder).glob("*.jsonl")):
            stream = b""
            for line in f.read_text().splitlines():
                rec = json.loads(line) if line.strip() else {}
                h = rec.get("hex")
                if not h:
                    continue
                payload = bytes.fromhex(h)
                framed = len(payload).to_bytes(4, "big") + payload
                if payload[:1] == b"\x80":
                    put("envelope", payload)
                    n["envelope"] += 1
                elif payload[:1] == b"\x94":
                    put("msgpack", payload)
                    n["msgpack"] += 1
                if len(stream) < 4096:
                    stream += framed
            # first byte: the frame target's cut/limit selector
            put("frame", b"\x40" + stream)
            n["frame"] += 1
    for f in sorted((ROOT / "fixtures" / "refs").glob("*.jsonl")):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            if "record" in rec:
                put("refs", bytes.fromhex(rec["record"]))
                n["refs"] += 1
    print(f"seeds written to {OUT}: {n}")


if __name__ == "__main__":
    main()
