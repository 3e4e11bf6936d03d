#!/usr/bin/env python3
"""Calls to functions whose name matches a pattern, summed over a callgrind
output file (its `calls=` lines): e.g. the allocations of a run.

    bench/callgrind_calls.py callgrind.out '^(malloc|calloc|realloc)$'

BENCHMARKS.md ("The real client's shape") divides that by the requests the
run made, as it divides callgrind's PROGRAM TOTALS (instructions).
"""
import re
import sys


def calls(path, pattern):
    names, total, callee = {}, 0, None
    with open(path) as f:
        for line in f:
            if line.startswith(("fn=", "cfn=")):
                key, _, rest = line.partition("=")
                m = re.match(r"\((\d+)\)(?: (.*))?", rest.strip())
                if m:
                    if m.group(2):
                        names[m.group(1)] = m.group(2)
                    if key == "cfn":
                        callee = names.get(m.group(1))
            elif line.startswith("calls="):
                if callee and pattern.search(callee):
                    total += int(line.split("=", 1)[1].split()[0])
                callee = None
    return total


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    print(calls(sys.argv[1], re.compile(sys.argv[2])))
