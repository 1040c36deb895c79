#!/usr/bin/env python3
"""Lists the module dependencies of one crate and fails on a cycle.

Usage: scripts/module-cycles.py SRC_DIR [SRC_DIR ...]   (e.g. services/intake/src)

A module is a file: `lib.rs`/`main.rs` is the crate root (`crate`), `a.rs` and `a/mod.rs` are
`a`, `a/b.rs` is `a::b`. An edge `X -> Y` means X names `crate::Y...` (in a `use` or inline;
`super::`, `self::` and paths starting at a child module are resolved too). Edges go to the deepest module file the path
names; a module's tests and the module itself are not edges. Prints every edge, then
each cycle found; exits 1 if there is one. Python 3 standard library only.
"""
import re
import sys
from pathlib import Path

PATH = re.compile(r"\b(crate|super|self)((?:\s*::\s*(?:\w+|\{))+)")


def module_of(src: Path, file: Path) -> tuple:
    parts = list(file.relative_to(src).with_suffix("").parts)
    if parts[-1] == "mod" or (len(parts) == 1 and parts[0] in ("lib", "main")):
        parts = parts[:-1]
    return tuple(parts)


def strip(text: str) -> str:
    """Removes comments, strings and `#[cfg(test)]` modules (tests may reach anywhere)."""
    text = re.sub(r"//[^\n]*", "", text)
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', text)
    out, i = [], 0
    for match in re.finditer(r"#\[cfg\(test\)\]\s*mod\s+\w+\s*\{", text):
        if match.start() < i:
            continue
        out.append(text[i : match.start()])
        depth, j = 1, match.end()
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        i = j
    out.append(text[i:])
    return "".join(out)


def expand(text: str, start: int) -> list:
    """The paths of a `use` tree beginning at text[start:] (after `crate`/`super`/`self`)."""
    paths, prefix, i = [], [], start
    while i < len(text):
        m = re.match(r"\s*::\s*", text[i:])
        if not m:
            break
        i += m.end()
        if text[i] == "{":
            depth, j = 1, i + 1
            while depth:
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                j += 1
            for item in split_top(text[i + 1 : j - 1]):
                head = re.match(r"\s*(\w+)", item)
                if not head:
                    continue
                rest = item[head.end() :]
                if re.match(r"\s*::", rest):
                    paths += [prefix + [head.group(1)] + p for p in expand(rest, 0)]
                else:
                    paths.append(prefix + [head.group(1)])
            return paths
        word = re.match(r"\w+", text[i:])
        if not word:
            break
        prefix.append(word.group(0))
        i += word.end()
    return [prefix]


def split_top(group: str) -> list:
    items, depth, current = [], 0, ""
    for ch in group:
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
            continue
        depth += {"{": 1, "}": -1}.get(ch, 0)
        current += ch
    return items + [current]


def edges_of(src: Path) -> dict:
    files = sorted(p for p in src.rglob("*.rs"))
    # With a library, main.rs is a binary crate of its own, using the library by name.
    if (src / "lib.rs").exists():
        files = [f for f in files if f != src / "main.rs"]
    modules = {module_of(src, f): f for f in files}
    edges = {m: set() for m in modules}
    for module, file in modules.items():
        text = strip(file.read_text())
        children = sorted({c[len(module)] for c in modules if len(c) > len(module) and c[: len(module)] == module})
        # A path may also start at a child module of this one (`grpc::IntakeGrpc` in lib.rs).
        relative = re.compile(r"(?<![\w:])(" + "|".join(children) + r")((?:\s*::\s*(?:\w+|\{))+)") if children else None
        found = [(m, {"crate": (), "self": module, "super": module[:-1]}[m.group(1)]) for m in PATH.finditer(text)]
        found += [(m, module + (m.group(1),)) for m in (relative.finditer(text) if relative else ())]
        for m, base in found:
            for path in expand(text, m.start(2)):
                words = list(path)
                while words and words[0] == "super":
                    base, words = base[:-1], words[1:]
                full = base + tuple(words)
                target = max((full[:n] for n in range(len(full) + 1) if full[:n] in modules), key=len)
                if target != module:
                    edges[module].add(target)
    return edges


def cycles(edges: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def name(module: tuple) -> str:
    return "::".join(module) or "crate"


def main(argv: list) -> int:
    if len(argv) < 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    status = 0
    for arg in argv[1:]:
        src = Path(arg)
        edges = edges_of(src)
        print(f"{src}:")
        for module in sorted(edges):
            for target in sorted(edges[module]):
                print(f"  {name(module)} -> {name(target)}")
        found = cycles(edges)
        for component in found:
            print(f"  CYCLE: {' <-> '.join(name(m) for m in component)}")
        if not found:
            print("  no cycles")
        status = max(status, 1 if found else 0)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv))
