#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0
"""Resolve the module's kernel-version switch for one kernel.

The module builds on 6.12 and 7.3 from one tree: Kbuild passes
`--cfg kernel_7_3` to Rust and `-DVSOCK_RS_KERNEL_7_3` to C from 7.3 on.
This tool writes the sources as one kernel sees them, with the switch gone:

- Rust: an item under `#[cfg(kernel_7_3)]` or `#[cfg(not(kernel_7_3))]`
  (the attribute on a line of its own, or before a parameter on its line)
  is kept without the attribute or dropped with the comments just above it;
  `src/compat_6_12.rs` exists for 6.12 only.
- C: `#ifdef VSOCK_RS_KERNEL_7_3` / `#else` / `#endif` blocks.
- Kbuild: the `ifeq ($(vsock_rs_kernel_7_3),y)` block and the test that sets it.

It serves `make patches` (the series for a 7.3 tree has no 6.12 code) and
counts `unsafe` blocks per kernel (--count-unsafe).

Usage: tools/kcfg.py --kernel 7.3 --out DIR FILE...   (paths relative to the top)
       tools/kcfg.py --count-unsafe
"""

import argparse
import os
import re
import sys

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = re.compile(r"^(\s*)#\[cfg\((not\()?kernel_7_3\)?\)\]\s*(.*)$")
COMMENT = re.compile(r"^\s*//")
ONLY_6_12 = {"src/compat_6_12.rs"}


def depth_change(line):
    """Net bracket depth of a line of Rust, strings and comments skipped."""
    d = 0
    i = 0
    in_str = False
    while i < len(line):
        c = line[i]
        if in_str:
            if c == "\\":
                i += 1
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        elif c == "'" and i + 2 < len(line) and line[i + 2] == "'":
            i += 2  # a char literal such as '{'
        elif line.startswith("//", i):
            break
        elif c in "([{":
            d += 1
        elif c in ")]}":
            d -= 1
        i += 1
    return d


def item_end(lines, start, first):
    """Index of the last line of the item whose text starts with `first`."""
    depth = depth_change(first)
    j = start
    text = first
    while True:
        code = text.split("//")[0].rstrip()
        if depth <= 0 and code.endswith((";", "}", ",")):
            return j
        j += 1
        if j >= len(lines):
            sys.exit(f"kcfg: unterminated cfg item from line {start + 1}")
        text = lines[j]
        depth += depth_change(text)


def resolve_rust(text, is_7_3):
    lines = text.split("\n")
    out = []
    i = 0
    while i < len(lines):
        m = CFG.match(lines[i])
        if not m:
            out.append(lines[i])
            i += 1
            continue
        indent, neg, rest = m.group(1), bool(m.group(2)), m.group(3)
        keep = neg != is_7_3
        if rest:  # the attribute and the item on one line
            end = item_end(lines, i, rest)
            body = [indent + rest] + lines[i + 1:end + 1]
        else:
            end = item_end(lines, i + 1, lines[i + 1])
            body = lines[i + 1:end + 1]
        if keep:
            out.extend(body)
        else:
            while out and COMMENT.match(out[-1]):
                out.pop()
        i = end + 1
    return "\n".join(out)


def resolve_c(text, is_7_3):
    out = []
    stack = []  # for each open #if: whether its lines are kept
    for line in text.split("\n"):
        s = line.strip()
        if s in ("#ifdef VSOCK_RS_KERNEL_7_3", "#ifndef VSOCK_RS_KERNEL_7_3"):
            stack.append(("ours", (s.startswith("#ifdef")) == is_7_3))
            continue
        if s.startswith("#if"):
            stack.append(("other", True))
        elif s == "#else" and stack and stack[-1][0] == "ours":
            stack[-1] = ("ours", not stack[-1][1])
            continue
        elif s.startswith("#endif") and stack:
            kind, _ = stack.pop()
            if kind == "ours":
                continue
        if all(k for _, k in stack):
            out.append(line)
    return "\n".join(out)


def resolve_kbuild(text, is_7_3):
    out = []
    state = None  # None, "then", "else"
    for line in text.split("\n"):
        if line.startswith("vsock_rs_kernel_7_3 :="):
            continue
        if line.strip() == "ifeq ($(vsock_rs_kernel_7_3),y)":
            state = "then"
            continue
        if state and line.strip() == "else":
            state = "else"
            continue
        if state and line.strip() == "endif":
            state = None
            continue
        if state is None or (state == "then") == is_7_3:
            out.append(line)
    # The comment on the switch goes with it.
    text = "\n".join(out)
    return re.sub(r"\n# The one build-time switch between the kernels[^\n]*(\n#[^\n]*)*\n",
                  "\n", text)


def resolve(path, text, is_7_3):
    if path.endswith(".rs"):
        return resolve_rust(text, is_7_3)
    if path.endswith((".c", ".h")):
        return resolve_c(text, is_7_3)
    if os.path.basename(path) == "Kbuild":
        return resolve_kbuild(text, is_7_3)
    return text


def rust_sources():
    out = []
    for d, _, files in os.walk(os.path.join(TOP, "src")):
        for f in files:
            if f.endswith(".rs") and "_generated" not in f:
                out.append(os.path.relpath(os.path.join(d, f), TOP))
    return sorted(out)


def count_unsafe(text):
    """`unsafe` blocks: `unsafe {`, not `unsafe fn`/`impl`/`extern`."""
    n = 0
    for line in text.split("\n"):
        code = line.split("//")[0]
        n += len(re.findall(r"\bunsafe\s*\{", code))
    return n


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kernel", choices=["6.12", "7.3"])
    p.add_argument("--out", help="write the resolved files under this directory")
    p.add_argument("--count-unsafe", action="store_true",
                   help="print the unsafe blocks of src/ per kernel")
    p.add_argument("--top", help="the tree to read (default: this one)")
    p.add_argument("files", nargs="*")
    a = p.parse_args()
    if a.top:
        global TOP
        TOP = os.path.abspath(a.top)
    if a.count_unsafe:
        for k in ("6.12", "7.3"):
            per = {}
            for f in rust_sources():
                if k != "6.12" and f in ONLY_6_12:
                    continue
                with open(os.path.join(TOP, f)) as fh:
                    n = count_unsafe(resolve(f, fh.read(), k != "6.12"))
                if n:
                    per[f] = n
            detail = ", ".join(f"{os.path.basename(f)} {n}" for f, n in per.items())
            print(f"{k}: {sum(per.values())} unsafe blocks ({detail})")
        return
    if not a.kernel or not a.out:
        p.error("--kernel and --out are needed to write files")
    for f in a.files:
        if a.kernel != "6.12" and f in ONLY_6_12:
            continue
        with open(os.path.join(TOP, f)) as fh:
            text = resolve(f, fh.read(), a.kernel != "6.12")
        dst = os.path.join(a.out, f)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        with open(dst, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
