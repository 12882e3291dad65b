#!/usr/bin/env python3
"""Usage: link-info.py MANIFEST MODULE

For one module that `swift build --target MODULE` compiled, prints (one per line) what a harness
needs to import and link it:
  - the -I and -Xcc flags SwiftPM compiled MODULE with (search paths and C module maps), so
    the harness sees the same modules;
  - the object files of MODULE and of everything it depends on, found by following the inputs of
    its compile command through the commands that produced them.
Read from SwiftPM's build manifest (`swift build --show-bin-path` + ".yaml"), so dependencies
added to Package.swift are picked up without editing the fuzz scripts.
"""
import json
import re
import sys

manifest, module = sys.argv[1], sys.argv[2]

# The manifest is YAML, but each command's inputs, outputs and args are one JSON-style list.
commands = []
with open(manifest) as f:
    for line in f:
        if re.match(r'^  "[^"]+":$', line):
            commands.append({})
            continue
        m = re.match(r"^    (inputs|outputs|args): (\[.*\])$", line)
        if m and commands:
            commands[-1][m.group(1)] = json.loads(m.group(2))

producer = {out: c for c in commands for out in c.get("outputs", [])}
module_file = next(out for out in producer if out.endswith(f"/Modules/{module}.swiftmodule"))

flags, args, i = [], producer[module_file]["args"], 0
while i < len(args) - 1:
    if args[i] in ("-I", "-Xcc"):
        flags += args[i:i + 2]
        i += 2
    else:
        i += 1

objects, seen, todo = [], set(), [module_file]
while todo:
    path = todo.pop()
    command = producer.get(path)
    if command is None or id(command) in seen:
        continue
    seen.add(id(command))
    objects += [o for o in command["outputs"] if o.endswith(".o")]
    todo += [i for i in command.get("inputs", []) if i.endswith((".swiftmodule", ".o"))]

print("\n".join(flags + sorted(set(objects))))
