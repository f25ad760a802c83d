"""Duplicate models: byte-identical files (same SHA256), and the same weights with different
metadata (same AutoV3, different SHA256: a re-saved or re-titled copy). Needs hashed files."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from catalog.store import Store


@dataclass
class DuplicateGroup:
    match: str  # "identical" or "same weights"
    hash: str
    paths: list[str]
    sizes: list[int]
    reclaimable: int  # bytes freed by keeping one copy (hard links to one file count once)


def find_duplicates(store: Store) -> list[DuplicateGroup]:
    rows = store.db.execute("SELECT path, size, sha256, autov3, device, inode FROM files "
                            "WHERE status != 'missing' AND sha256 IS NOT NULL "
                            "ORDER BY path").fetchall()
    groups: list[DuplicateGroup] = []
    by_sha = defaultdict(list)
    for row in rows:
        by_sha[row["sha256"]].append(row)
    identical = {sha for sha, members in by_sha.items() if len(members) > 1}
    for sha in sorted(identical):
        groups.append(_group("identical", sha, by_sha[sha]))
    # same weights: one representative per SHA256, grouped by AutoV3
    by_v3 = defaultdict(list)
    for members in by_sha.values():
        if members[0]["autov3"]:
            by_v3[members[0]["autov3"]].append(members[0])
    for v3, members in sorted(by_v3.items()):
        if len(members) > 1:
            groups.append(_group("same weights", v3, members))
    return sorted(groups, key=lambda g: -g.reclaimable)


def _group(match: str, digest: str, rows) -> DuplicateGroup:
    distinct: dict[tuple[int, int], int] = {}
    for row in rows:
        distinct.setdefault((row["device"], row["inode"]), row["size"])
    sizes = sorted(distinct.values())
    return DuplicateGroup(match, digest, [r["path"] for r in rows], [r["size"] for r in rows],
                          sum(sizes) - (sizes[-1] if sizes else 0))
