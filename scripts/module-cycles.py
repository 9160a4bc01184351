#!/usr/bin/env python3
"""Import cycles between the modules of one crate.

Usage: scripts/module-cycles.py crates/server crates/gateway

A module depends on another when its file names it through `crate::NAME`
(in a `use` or a path) or `super::NAME` from a top-level module. Prints each
cycle (a strongly connected group of two or more modules) and exits 1 when
there is one; tests (`#[cfg(test)]` modules) are left out.
"""
import re
import sys
from pathlib import Path


def modules(src: Path):
    """Top-level module name -> the text of its files (mod.rs and children)."""
    out = {}
    for f in sorted(src.rglob("*.rs")):
        rel = f.relative_to(src)
        top = rel.parts[0][:-3] if len(rel.parts) == 1 else rel.parts[0]
        if top in ("lib", "main"):
            top = "(root)"
        text = f.read_text()
        # Unit tests may reach anywhere.
        cut = re.search(r"#\[cfg\(test\)\]\s*mod tests", text)
        if cut:
            text = text[: cut.start()]
        text = re.sub(r"//.*", "", text)
        out[top] = out.get(top, "") + text
    return out


def edges(mods):
    names = set(mods) - {"(root)"}
    graph = {m: set() for m in mods}
    for m, text in mods.items():
        for use in re.finditer(r"\bcrate::\{([^}]*)\}", text):
            for part in use.group(1).split(","):
                n = part.strip().split("::")[0]
                if n in names and n != m:
                    graph[m].add(n)
        for ref in re.finditer(r"\bcrate::([a-z_][a-z0-9_]*)", text):
            n = ref.group(1)
            if n in names and n != m:
                graph[m].add(n)
        if m != "(root)":
            for ref in re.finditer(r"\bsuper::([a-z_][a-z0-9_]*)", text):
                n = ref.group(1)
                if n in names and n != m:
                    graph[m].add(n)
    return graph


def cycles(graph):
    """Tarjan's strongly connected components of two or more."""
    index, low, on, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def main():
    found = False
    for crate in sys.argv[1:] or ["crates/server", "crates/gateway"]:
        graph = edges(modules(Path(crate) / "src"))
        for group in cycles(graph):
            found = True
            inner = {m: sorted(graph[m] & set(group)) for m in group}
            print(f"{crate}: cycle among {', '.join(group)}")
            for m in group:
                print(f"    {m} -> {', '.join(inner[m])}")
    if not found:
        print("no import cycles")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
