"""Where a model came from and what was made from it, as the files' own metadata records it
(merge inputs, training bases), joined to catalog entries by hash where the catalog has them."""

from __future__ import annotations

from dataclasses import dataclass, field

from catalog.entries import Entry
from catalog.store import Store

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

    def to_dict(self) -> dict:
        return {"role": self.role, "name": self.name, "ref": self.ref, "entry_id": self.entry_id,
                "path": self.path, "parents": [p.to_dict() for p in self.parents]}


@dataclass
class Lineage:
    tree: Node
    children: list[Node]

    def to_dict(self) -> dict:
        return {"ancestry": self.tree.to_dict(), "children": [c.to_dict() for c in self.children]}


def _entry_with(store: Store, ref_kind: str, ref: str):
    column = {"sha256": "sha256", "autov1": "autov1", "autov3": "autov3"}.get(ref_kind)
    if column is None:
        return None
    return store.db.execute(f"SELECT id, name, path FROM files WHERE {column} = ? "
                            "ORDER BY status = 'missing', id LIMIT 1", (ref,)).fetchone()


def _parents(store: Store, file_id: int, depth: int, seen: set[int]) -> list[Node]:
    nodes = []
    for row in store.db.execute("SELECT ref_kind, ref, name, role FROM parents WHERE file_id = ? "
                                "ORDER BY role DESC, name", (file_id,)).fetchall():
        found = _entry_with(store, row["ref_kind"], row["ref"])
        node = Node(row["role"], found["name"] if found else row["name"], row["ref"],
                    found["id"] if found else None, found["path"] if found else None)
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
    return Lineage(tree, children)
