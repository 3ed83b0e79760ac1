#!/usr/bin/env python3
"""check-includes.py - the include rule of the library's rooms (docs/layout.md), checked.

Reads every #include "..." of csrc/ and kernels/ and fails (exit 1, one line per finding) when
  - the include graph of modules has a cycle: a module is a source file together with the
    header of the same name in the same folder (layer.c + layer.h), so a .c that calls into
    another module whose .c calls back through a header is a cycle too;
  - a file includes a header its room may not see (the table ROOMS below: comm/ sees only the
    memory interface of the backends, a backend never sees the layer handle, and so on);
  - a header of a module declares a function another module defines (a header that is a
    module's own, layer.h beside layer.c, declares only what its .c defines): otherwise one
    header could hide a call back into its includer, the cycle the module graph cannot see;
  - an include names a project header that does not exist.
usage: check-includes.py [ROOT]     the tree to check (default: the repository of this script)
       check-includes.py --self-test  checks that a cycle and a forbidden include are reported
"""
import os
import re
import sys
import tempfile

SOURCES = (".c", ".h", ".cu", ".cuh")
INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"')

# Rooms, first match wins: (prefix of the file's path, prefixes of the headers it may include).
# Paths are from the repository root; public headers are include/moe/...
ROOMS = [
    ("csrc/core/", ("csrc/core/", "include/moe/")),
    ("csrc/router/", ("csrc/router/", "csrc/core/", "include/moe/")),
    ("csrc/backend/memory.h", ("include/moe/",)),
    ("csrc/backend/cuda/", ("csrc/backend/", "csrc/core/", "csrc/router/", "csrc/state.h",
                            "csrc/context.h", "kernels/", "include/moe/")),
    ("csrc/backend/", ("csrc/backend/memory.h", "csrc/backend/backend.h", "csrc/backend/cpu/",
                       "csrc/core/", "csrc/router/", "csrc/state.h", "csrc/context.h",
                       "include/moe/")),
    ("csrc/comm/", ("csrc/comm/", "csrc/core/", "csrc/backend/memory.h", "include/moe/")),
    ("csrc/state.h", ("csrc/router/", "csrc/core/", "include/moe/")),
    ("csrc/context.h", ("csrc/backend/memory.h", "include/moe/")),
    ("csrc/handle.h", ("csrc/context.h", "csrc/state.h", "csrc/core/", "include/moe/")),
    ("kernels/", ("kernels/", "csrc/core/", "csrc/router/")),
    # the layer, its buffers, traces, the scheduler, the optimizer and the context calls: any
    # header of the library (the cycle check keeps their arrows pointing one way)
    ("csrc/", ("csrc/", "include/moe/")),
]


def room_of(path):
    for prefix, allowed in ROOMS:
        if path == prefix or path.startswith(prefix):
            return prefix, allowed
    return None, ()


def resolve(root, src, name):
    """the repository path an include names, or None when it is not a project header"""
    candidates = [os.path.join(os.path.dirname(src), name), os.path.join("csrc", name),
                  os.path.join("include", name), name]
    for c in candidates:
        c = os.path.normpath(c)
        if os.path.isfile(os.path.join(root, c)):
            return c
    return None


def module_of(path):
    return os.path.splitext(path)[0]


def scan(root):
    """{file: [(line number, include text, resolved path or None)]} for csrc/ and kernels/"""
    files = {}
    for top in ("csrc", "kernels"):
        for d, _, names in os.walk(os.path.join(root, top)):
            for n in sorted(names):
                if not n.endswith(SOURCES):
                    continue
                path = os.path.relpath(os.path.join(d, n), root)
                incs = []
                with open(os.path.join(root, path), encoding="utf-8") as f:
                    for i, line in enumerate(f, 1):
                        m = INCLUDE.match(line)
                        if m:
                            incs.append((i, m.group(1), resolve(root, path, m.group(1))))
                files[path] = incs
    return files


FUNC = re.compile(r"^(?!static\b|typedef\b|extern\b|return\b)[A-Za-z_][\w \t\*]*?\b([A-Za-z_]\w*)\s*\(")


def functions(text, want_definition):
    """names of the functions a file declares (want_definition False: a prototype ending in ;)
    or defines (True: a body follows), from declarations that start in column 0"""
    names = set()
    for m in re.finditer(FUNC.pattern, text, re.M):
        rest = text[m.end():]
        end = min((i for i in (rest.find(";"), rest.find("{")) if i >= 0), default=-1)
        if end < 0:
            continue
        if (rest[end] == "{") == want_definition:
            names.add(m.group(1))
    return names


def check_declarations(root, files):
    """findings of headers declaring functions that another module defines"""
    defined = {}
    for path in files:
        if path.endswith((".c", ".cu")):
            with open(os.path.join(root, path), encoding="utf-8") as f:
                for name in functions(f.read(), True):
                    defined.setdefault(name, path)
    problems = []
    for path in sorted(files):
        if not path.endswith(".h"):
            continue
        mod = module_of(path)
        if not any(module_of(p) == mod and p != path for p in files):
            continue  # an interface header (backend.h, cpu.h, kernels.h): no module of its own
        with open(os.path.join(root, path), encoding="utf-8") as f:
            for name in sorted(functions(f.read(), False)):
                where = defined.get(name)
                if where is not None and module_of(where) != mod:
                    problems.append("%s declares %s, which %s defines: declare it in that "
                                    "module's header" % (path, name, where))
    return problems


def find_cycle(graph):
    """one cycle of the directed graph as a list of nodes, or None"""
    WHITE, GREY, BLACK = 0, 1, 2
    color = {n: WHITE for n in graph}
    stack = []

    def visit(n):
        color[n] = GREY
        stack.append(n)
        for m in sorted(graph[n]):
            if color.get(m, BLACK) == GREY:
                return stack[stack.index(m):] + [m]
            if color.get(m) == WHITE:
                c = visit(m)
                if c:
                    return c
        stack.pop()
        color[n] = BLACK
        return None

    for n in sorted(graph):
        if color[n] == WHITE:
            c = visit(n)
            if c:
                return c
    return None


def check(root):
    files = scan(root)
    problems = []
    graph = {}
    for path, incs in sorted(files.items()):
        mod = module_of(path)
        graph.setdefault(mod, set())
        room, allowed = room_of(path)
        for line, text, target in incs:
            where = "%s:%d" % (path, line)
            if target is None:
                if text.startswith(("moe/", "kernels/", "core/", "backend/", "comm/",
                                    "router/")) or not text.endswith((".h", ".cuh")):
                    problems.append('%s: #include "%s" names no header of the project'
                                    % (where, text))
                continue  # a system or third-party header in quotes
            if room is not None and not target.startswith(allowed):
                problems.append('%s: #include "%s": the room %s may not include %s'
                                % (where, text, room, target))
            tmod = module_of(target)
            if tmod != mod and not target.startswith("include/"):
                graph[mod].add(tmod)
    for m in list(graph):
        for t in graph[m]:
            graph.setdefault(t, set())
    problems += check_declarations(root, files)
    cycle = find_cycle(graph)
    if cycle:
        problems.append("include cycle between modules: " + " -> ".join(cycle))
    return files, problems


def self_test():
    """a tree with a cycle (a.c -> b.h, b.c -> a.h) and comm including the compute backend"""
    with tempfile.TemporaryDirectory() as root:
        tree = {
            "csrc/a.h": "", "csrc/a.c": '#include "a.h"\n#include "b.h"\n',
            "csrc/b.h": "", "csrc/b.c": '#include "b.h"\n#include "a.h"\n',
            "csrc/backend/backend.h": "", "csrc/backend/memory.h": "",
            "csrc/comm/comm.c": '#include "backend/memory.h"\n#include "backend/backend.h"\n',
            "kernels/k.cu": '#include "core/missing.h"\n',
            "csrc/c.h": "int moe__d_run(int n);\n", "csrc/c.c": '#include "c.h"\n',
            "csrc/d.c": "int moe__d_run(int n) {\n    return n;\n}\n",
        }
        for p, text in tree.items():
            os.makedirs(os.path.dirname(os.path.join(root, p)), exist_ok=True)
            with open(os.path.join(root, p), "w", encoding="utf-8") as f:
                f.write(text)
        _, problems = check(root)
    want = ["include cycle between modules: csrc/a -> csrc/b -> csrc/a",
            'csrc/comm/comm.c:2: #include "backend/backend.h": the room csrc/comm/ may not '
            "include csrc/backend/backend.h",
            'kernels/k.cu:1: #include "core/missing.h" names no header of the project',
            "csrc/c.h declares moe__d_run, which csrc/d.c defines: declare it in that "
            "module's header"]
    missing = [w for w in want if w not in problems]
    extra = [p for p in problems if p not in want]
    for w in missing:
        print("self-test: not reported: " + w)
    for p in extra:
        print("self-test: reported without cause: " + p)
    if missing or extra:
        return 1
    print("self-test OK: %d planted problems reported" % len(want))
    return 0


def main(argv):
    if len(argv) > 1 and argv[1] == "--self-test":
        return self_test()
    root = argv[1] if len(argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                      "..")
    files, problems = check(os.path.abspath(root))
    for p in problems:
        print(p)
    if problems:
        print("%d include problems (the rule: docs/layout.md)" % len(problems))
        return 1
    n = sum(len(v) for v in files.values())
    print("includes OK: %d files, %d project includes, no cycle" % (len(files), n))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
