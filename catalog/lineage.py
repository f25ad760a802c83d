"""Where a model came from and what was made from it, as the files' own metadata records it
(merge inputs, training bases), joined to catalog entries by hash where the catalog has them.

A parent the catalog holds but has not hashed yet is still found when a file of its name has the
SHA256 mergekit-sd remembered on hashing it (a bake or merge hashes its inputs): no file is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePosixPath

from catalog.entries import Entry
from catalog.store import Store
from mergekit_sd.io.hash_cache import known_sha256

MAX_DEPTH = 8  # ancestry is rarely deeper; a cycle (impossible by hashes, possible by edits) stops


@dataclass
class Node:
    # merge input, bake base, baked LoRA, ancestor, training base, baked VAE; "" for the entry
    role: str
    name: str
    ref: str  # the hash the metadata gives (sha256 or AutoV1/AutoV3), or ""
    entry_id: int | None  # the catalog entry that has this hash, if any
    path: str | None
    parents: list[Node] = field(default_factory=list)
    # False: the entry was found by its file name and remembered SHA256, unhashed in the catalog
    hashed: bool = True

    def to_dict(self) -> dict:
        return {"role": self.role, "name": self.name, "ref": self.ref, "entry_id": self.entry_id,
                "path": self.path, "hashed": self.hashed,
                "parents": [p.to_dict() for p in self.parents]}


@dataclass
class Lineage:
    tree: Node
    children: list[Node]
    unhashed: int = 0  # catalog entries with no SHA256 yet: a parent may be one of them

    def to_dict(self) -> dict:
        return {"ancestry": self.tree.to_dict(), "children": [c.to_dict() for c in self.children],
                "unhashed_entries": self.unhashed}


def _entry_with(store: Store, ref_kind: str, ref: str):
    column = {"sha256": "sha256", "autov1": "autov1", "autov3": "autov3"}.get(ref_kind)
    if column is None:
        return None
    return store.db.execute(f"SELECT id, name, path FROM files WHERE {column} = ? "
                            "ORDER BY status = 'missing', id LIMIT 1", (ref,)).fetchone()


def _unhashed_entry_with(store: Store, ref_kind: str, ref: str, name: str):
    """An entry not hashed yet whose file has the file name the metadata gives the parent and
    the SHA256 `ref` as remembered (`known_sha256`, valid while the file is unchanged)."""
    file_name = PurePosixPath(name.replace("\\", "/")).name
    if ref_kind != "sha256" or not file_name:
        return None
    tail = "/" + file_name
    for row in store.db.execute(
            "SELECT id, name, path FROM files WHERE sha256 IS NULL AND status = 'ok' AND "
            "substr(path, -?) = ? ORDER BY id", (len(tail), tail)).fetchall():
        if known_sha256(row["path"]) == ref:
            return row
    return None


def _parents(store: Store, file_id: int, depth: int, seen: set[int]) -> list[Node]:
    nodes = []
    for row in store.db.execute("SELECT ref_kind, ref, name, role FROM parents WHERE file_id = ? "
                                "ORDER BY role DESC, name", (file_id,)).fetchall():
        found = _entry_with(store, row["ref_kind"], row["ref"])
        by_name = None
        if found is None:
            found = by_name = _unhashed_entry_with(store, row["ref_kind"], row["ref"], row["name"])
        node = Node(row["role"], found["name"] if found else row["name"], row["ref"],
                    found["id"] if found else None, found["path"] if found else None,
                    hashed=by_name is None)
        if found and depth < MAX_DEPTH and found["id"] not in seen:
            node.parents = _parents(store, found["id"], depth + 1, seen | {found["id"]})
        nodes.append(node)
    return nodes


def lineage(store: Store, entry: Entry) -> Lineage:
    tree = Node("", entry.name, entry.sha256 or "", entry.id, entry.path,
                _parents(store, entry.id, 1, {entry.id}))
    refs = [(kind, value) for kind, value in (("sha256", entry.sha256), ("autov1", entry.autov1),
                                              ("autov3", entry.autov3)) if value]
    children = []
    for kind, value in refs:
        for row in store.db.execute(
                "SELECT DISTINCT f.id, f.name, f.path, p.role FROM parents p JOIN files f ON "
                "f.id = p.file_id WHERE p.ref_kind = ? AND p.ref = ? ORDER BY f.name",
                (kind, value)):
            children.append(Node(row["role"], row["name"], "", row["id"], row["path"]))
    unhashed = store.db.execute("SELECT count(*) FROM files WHERE sha256 IS NULL AND "
                                "status = 'ok'").fetchone()[0]
    return Lineage(tree, children, unhashed)
