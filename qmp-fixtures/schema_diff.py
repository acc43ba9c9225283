#!/usr/bin/env python3
"""Compare the QAPI schema the Rust `qapi-qmp` crate is generated from with
the schema a real QEMU reports through `query-qmp-schema` (stdlib only).

Usage:
  schema_diff.py [--crate-schema DIR] TRANSCRIPT.jsonl [more.jsonl ...]

DIR defaults to the newest ~/.cargo/registry/src/*/qapi-qmp-*/schema/qapi.
TRANSCRIPT is a qmp-schema.jsonl recorded by record.py.

Introspection hides type names, so both schemas are walked in parallel from
the named entry points (commands and events) down through members, array
elements, union branches and alternates.  Printed, per path:
  - events and commands that exist on only one side;
  - enum values that exist on only one side;
  - object members that exist on only one side, or whose optionality differs.
Each line starts with `out` (something QEMU sends: event data, command
returns; what a client must be able to parse) or `in` (what QEMU accepts).
Paths read like `event SHUTDOWN .reason` or `command query-status ->.status`
(`->` is the return type, `<-` the arguments).
"""

import ast
import glob
import json
import os
import re
import sys

BUILTIN_SRC = {"str", "int", "int8", "int16", "int32", "int64", "uint8", "uint16",
               "uint32", "uint64", "size", "number", "bool", "null", "any", "QType"}


# --- crate side: QAPI source files ----------------------------------------

def _strip_comments(text):
    out = []
    for line in text.splitlines():
        res, q = [], False
        for ch in line:
            if ch == "'":
                q = not q
            if ch == "#" and not q:
                break
            res.append(ch)
        out.append("".join(res))
    return "\n".join(out)


def _exprs(text):
    text = _strip_comments(text)
    depth, start, q = 0, None, False
    for i, ch in enumerate(text):
        if ch == "'":
            q = not q
        if q:
            continue
        if ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                src = text[start:i + 1]
                src = re.sub(r"\btrue\b", "True", src)
                src = re.sub(r"\bfalse\b", "False", src)
                yield ast.literal_eval(src)


def load_crate(schema_dir):
    ents = {}
    for path in sorted(glob.glob(os.path.join(schema_dir, "*.json"))):
        with open(path, encoding="utf-8") as f:
            for e in _exprs(f.read()):
                for meta in ("struct", "union", "alternate", "enum", "command", "event"):
                    if meta in e:
                        ents[(meta if meta in ("command", "event") else "type", e[meta])] = e
    return ents


class CrateSchema:
    def __init__(self, schema_dir):
        self.ents = load_crate(schema_dir)
        self.commands = {n: e for (k, n), e in self.ents.items() if k == "command"}
        self.events = {n: e for (k, n), e in self.ents.items() if k == "event"}

    def _members(self, data):
        """dict of QAPI members -> {name: (typeref, optional)}"""
        res = {}
        for k, v in (data or {}).items():
            opt = k.startswith("*")
            name = k[1:] if opt else k
            if isinstance(v, dict):
                v = v["type"]
            res[name] = (v, opt)
        return res

    def resolve(self, ref):
        """typeref -> normalised form."""
        if ref is None:
            return ("object", {}, None, {})
        if isinstance(ref, list):
            return ("array", ref[0])
        if isinstance(ref, dict):  # anonymous struct
            return ("object", self._members(ref), None, {})
        if ref in BUILTIN_SRC:
            return ("builtin", ref)
        e = self.ents.get(("type", ref))
        if e is None:
            return ("unknown", ref)
        if "enum" in e:
            vals = [v["name"] if isinstance(v, dict) else v for v in e["data"]]
            return ("enum", vals)
        if "alternate" in e:
            return ("alternate", [v["type"] if isinstance(v, dict) else v
                                  for v in e["data"].values()])
        members = {}
        base = e.get("base")
        if base is not None:
            members.update(self.resolve(base)[1])
        if "struct" in e:
            members.update(self._members(e.get("data")))
            return ("object", members, None, {})
        # union
        branches = {}
        for case, t in e["data"].items():
            branches[case] = t["type"] if isinstance(t, dict) else t
        return ("object", members, e["discriminator"], branches)


# --- QEMU side: query-qmp-schema ------------------------------------------

class IntroSchema:
    def __init__(self, entities):
        self.by_name = {e["name"]: e for e in entities}
        self.commands = {e["name"]: e for e in entities if e["meta-type"] == "command"}
        self.events = {e["name"]: e for e in entities if e["meta-type"] == "event"}

    def resolve(self, name):
        e = self.by_name[name]
        mt = e["meta-type"]
        if mt == "builtin":
            return ("builtin", e["name"])
        if mt == "enum":
            return ("enum", list(e["values"]))
        if mt == "array":
            return ("array", e["element-type"])
        if mt == "alternate":
            return ("alternate", [m["type"] for m in e["members"]])
        members = {m["name"]: (m["type"], "default" in m) for m in e["members"]}
        branches = {v["case"]: v["type"] for v in e.get("variants", [])}
        return ("object", members, e.get("tag"), branches)


def load_intro(transcript):
    with open(transcript, encoding="utf-8") as f:
        recs = [json.loads(l) for l in f]
    hdr = recs[0]
    id_ = None
    for r in recs[1:]:
        if "c" in r and "query-qmp-schema" in r["c"]:
            id_ = json.loads(r["c"])["id"]
        if "s" in r and id_ is not None:
            o = json.loads(r["s"])
            if o.get("id") == id_:
                return hdr["qemu"], IntroSchema(o["return"])
    raise SystemExit("%s: no query-qmp-schema reply" % transcript)


# --- parallel walk -----------------------------------------------------------

def pair_diffs(intro, crate, it, ct, memo, busy):
    """Differences below one (introspected type, crate type) pair, as a list of
    (relative path, message).  Memoised; cycles are cut."""
    key = (it, json.dumps(ct, sort_keys=True))
    if key in memo:
        return memo[key]
    if key in busy:
        return []
    busy.add(key)
    out = []
    a = intro.resolve(it)
    b = crate.resolve(ct)
    if a[0] == "builtin" or b[0] in ("builtin", "unknown"):
        pass
    elif a[0] != b[0]:
        out.append(("", "kind differs (qemu %s, crate %s)" % (a[0], b[0])))
    elif a[0] == "enum":
        new = [v for v in a[1] if v not in b[1]]
        gone = [v for v in b[1] if v not in a[1]]
        if new:
            out.append(("", "enum values only in QEMU: %s" % ", ".join(new)))
        if gone:
            out.append(("", "enum values only in crate: %s" % ", ".join(gone)))
    elif a[0] == "array":
        out += [("[]" + p, m) for p, m in pair_diffs(intro, crate, a[1], b[1], memo, busy)]
    elif a[0] == "alternate":
        for x in a[1]:  # pair alternatives by kind
            ka = intro.resolve(x)[0]
            for y in b[1]:
                if crate.resolve(y)[0] == ka and ka != "builtin":
                    out += [("|" + ka + p, m)
                            for p, m in pair_diffs(intro, crate, x, y, memo, busy)]
    else:
        am, bm = a[1], b[1]
        for n in am:
            if n not in bm:
                out.append(("", "member only in QEMU: %s%s"
                            % (n, " (optional)" if am[n][1] else " (required)")))
        for n in bm:
            if n not in am:
                out.append(("", "member only in crate: %s%s"
                            % (n, " (optional)" if bm[n][1] else " (required)")))
        for n in am:
            if n in bm:
                if am[n][1] != bm[n][1]:
                    out.append(("." + n, "optional in %s only"
                                % ("QEMU" if am[n][1] else "crate")))
                out += [("." + n + p, m)
                        for p, m in pair_diffs(intro, crate, am[n][0], bm[n][0], memo, busy)]
        for case, t in a[3].items():
            if case in b[3]:
                out += [("{%s=%s}%s" % (a[2], case, p), m)
                        for p, m in pair_diffs(intro, crate, t, b[3][case], memo, busy)]
    busy.discard(key)
    memo[key] = out
    return out


def diff(intro, crate):
    """Lines 'DIRECTION PATH: message'.  DIRECTION is `out` for what QEMU sends
    (events, command returns) and `in` for what it accepts (arguments)."""
    out = []
    memo = {}
    def add(direction, root, it, ct):
        for p, m in pair_diffs(intro, crate, it, ct, memo, set()):
            out.append("%-3s %s%s: %s" % (direction, root, p, m))
    for name in sorted(set(intro.events) | set(crate.events)):
        if name not in crate.events:
            out.append("out event %s: only in QEMU" % name)
        elif name not in intro.events:
            out.append("out event %s: only in crate" % name)
        else:
            add("out", "event %s " % name, intro.events[name]["arg-type"],
                crate.events[name].get("data"))
    for name in sorted(set(intro.commands) | set(crate.commands)):
        if name not in crate.commands:
            out.append("in  command %s: only in QEMU" % name)
        elif name not in intro.commands:
            out.append("in  command %s: only in crate" % name)
        else:
            c = crate.commands[name]
            add("in", "command %s <-" % name, intro.commands[name]["arg-type"], c.get("data"))
            add("out", "command %s ->" % name, intro.commands[name]["ret-type"], c.get("returns"))
    return out


def main(argv):
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--crate-schema")
    ap.add_argument("transcripts", nargs="+")
    o = ap.parse_args(argv)
    d = o.crate_schema
    if not d:
        cands = sorted(glob.glob(os.path.expanduser(
            "~/.cargo/registry/src/*/qapi-qmp-*/schema/qapi")))
        if not cands:
            raise SystemExit("no qapi-qmp crate source found; pass --crate-schema")
        d = cands[-1]
    crate = CrateSchema(d)
    for t in o.transcripts:
        ver, intro = load_intro(t)
        label = os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(d))))
        print("### QEMU %s (query-qmp-schema) vs %s schema" % (ver, label))
        for line in diff(intro, crate):
            print(line)
        print()


if __name__ == "__main__":
    main(sys.argv[1:])
