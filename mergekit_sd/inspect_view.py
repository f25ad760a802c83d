"""Rich tables for `mergekit-sd inspect` reports (the data comes from inspect_report)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.rule import Rule
from rich.table import Table

from mergekit_sd.data_console import data_console, rule_width


def human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def human_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _dtype_mix(dtypes: dict[str, int]) -> str:
    return ", ".join(f"{d}×{n}" for d, n in sorted(dtypes.items(), key=lambda x: -x[1]))


HEADERS = ("file", "what it is", "kind", "layout", "dtypes", "params", "size")
MIN_DESCRIPTION = 16  # the narrowest "what it is" worth keeping file names whole for


def show_reports(reports: list[dict], detailed: bool) -> None:
    # no markup or highlighting: cells are plain data (file names may contain [brackets]),
    # and the highlighter's regexes are most of the rendering time; lines whole when piped
    # (`inspect ... | grep`), tables the terminal's width in one
    console = data_console()
    if not reports:
        return
    console.print(_summary([_summary_row(r) for r in reports], console.width))
    if detailed:
        for r in reports:
            _show_details(console, r)


def _summary_row(r: dict) -> tuple[str, ...]:
    label = r["label"]
    if r.get("lora") and r["lora"]["rank"]:
        label += f", rank {r['lora']['rank']}"
    return (Path(r["path"]).name, label, r["kind"], r["layout"] or "-", _dtype_mix(r["dtypes"]),
            human_count(r["parameters"]), human_size(r["file_size"]))


def _summary(rows: list[tuple[str, ...]], width: int) -> Table:
    """The one-line-per-file table. File names stay whole where the terminal leaves them room
    beside the short columns and a description of `MIN_DESCRIPTION` (which then wraps at its
    spaces); in a narrower one, names and descriptions share the room, and in a very narrow
    one every column wraps."""
    def needs(column: int) -> int:  # the dtypes one per line, as a narrow terminal gets them
        texts = (HEADERS[column], *(row[column] for row in rows))
        parts = [w for t in texts for w in t.split(", ")] if HEADERS[column] == "dtypes" \
            else texts
        return max(map(len, parts))

    borders = 3 * len(HEADERS) + 1
    room = width - borders - sum(needs(i) for i in range(2, len(HEADERS)))
    if room < MIN_DESCRIPTION:
        return _stacked_summary(rows)
    whole_names = needs(0) + MIN_DESCRIPTION <= room
    table = Table(title="Model files", title_justify="left")
    table.add_column(HEADERS[0], overflow="fold", no_wrap=whole_names,
                     ratio=None if whole_names else 3)
    table.add_column(HEADERS[1], overflow="fold", ratio=None if whole_names else 3)
    for header in HEADERS[2:]:  # "checkpoint", not "checkpoin/t"
        table.add_column(header, overflow="fold", no_wrap=True)
    dtypes = HEADERS.index("dtypes")
    for row in rows:
        if not whole_names:  # a narrow terminal: one dtype a line
            row = (*row[:dtypes], row[dtypes].replace(", ", "\n"), *row[dtypes + 1:])
        table.add_row(*row)
    return table


def _stacked_summary(rows: list[tuple[str, ...]]) -> Table:
    """The summary for a terminal too narrow for seven columns beside a readable description
    (80 columns and a mixed set of files): kind over layout and parameters over size, so
    that no short word breaks and the description keeps its longest word whole."""
    longest_word = max(len(w) for row in rows for w in row[1].split())
    table = Table(title="Model files", title_justify="left")
    table.add_column(HEADERS[0], overflow="fold", ratio=1)
    table.add_column(HEADERS[1], overflow="fold", ratio=1, min_width=longest_word)
    for header in ("kind\nlayout", "dtypes", "params\nsize"):
        table.add_column(header, no_wrap=True)
    for name, label, kind, layout, dtypes, params, size in rows:
        table.add_row(name, label, f"{kind}\n{layout}", dtypes.replace(", ", "\n"),
                      f"{params}\n{size}")
    return table


def _show_details(console: Console, r: dict) -> None:
    width = rule_width(console, r["path"])
    if len(r["path"]) + 4 <= width:
        console.print(Rule(r["path"]), width=width)
    else:  # a rule would cut the path short (…): it gets lines of its own
        console.print(Rule(), width=width)
        console.print(r["path"], overflow="fold")
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column(overflow="fold")
    facts.add_row("architecture", str(r["architecture"]))
    for key in ("variant", "prediction"):
        if r.get(key):
            facts.add_row(key, r[key])
    facts.add_row("file", r["status"])
    if r["header_bytes"] is not None:  # a pickle has none
        facts.add_row("header", f"{r['header_bytes']} bytes read")
    lora = r.get("lora")
    if lora:
        facts.add_row("LoRA", f"{lora['format']}; {lora['modules']} "
                              f"module{'s' if lora['modules'] != 1 else ''}; {_rank_text(lora)}")
        facts.add_row("targets", ", ".join(lora["targets"]))
        facts.add_row("blocks", " ".join(lora["blocks"]) or "-")
        if lora["trigger_words"]:
            facts.add_row("trigger words", ", ".join(lora["trigger_words"]))
    for line in r["evidence"]:
        facts.add_row("evidence", line)
    for line in r["caveats"]:
        facts.add_row("cannot tell", line)
    console.print(facts)
    if r["components"]:
        console.print(_components(r["components"], console.width))
    _show_metadata(console, r["metadata"])


COMPONENT_HEADERS = ("component", "model", "prefix", "keys", "params", "size", "dtypes")


def _components(components: list[dict], width: int) -> Table:
    """The components table. Slots and prefixes tell text_encoder_2 from _3, so they are
    never cut short (…): slots stay whole and prefixes fold; a narrow terminal (80 columns)
    gets parameters over size to leave the model and prefix room."""
    rows = [(c["slot"], c["model"], c["prefix"] or "-", str(c["keys"]),
             human_count(c["parameters"]), human_size(c["nbytes"]), _dtype_mix(c["dtypes"]))
            for c in components]
    needs = [max(len(text) for text in (h, *(row[i] for row in rows)))
             for i, h in enumerate(COMPONENT_HEADERS)]
    longest_word = min(12, max(len(w) for row in rows for w in row[1].split()))
    stacked = sum(needs) - needs[1] - needs[2] + 2 * longest_word + 3 * len(needs) + 1 > width
    headers = list(COMPONENT_HEADERS)
    if stacked:
        headers[4:6] = ["params\nsize"]
        rows = [(*row[:4], f"{row[4]}\n{row[5]}", row[6]) for row in rows]
    table = Table(title="components", title_justify="left")
    table.add_column(headers[0], no_wrap=True)
    table.add_column(headers[1], overflow="fold", ratio=1, min_width=longest_word)
    table.add_column(headers[2], overflow="fold", ratio=1)
    for header in headers[3:]:
        table.add_column(header, no_wrap=True)
    for row in rows:
        table.add_row(*row)
    return table


def _rank_text(lora: dict) -> str:
    if lora["rank"] is None:  # a full diff: no module has a rank (nor an alpha)
        return "full-rank weight differences (no rank or alpha)"
    ranks = ", ".join(f"{rank}×{n}" for rank, n in sorted(lora["ranks"].items()))
    return f"rank {lora['rank']} ({ranks}); alpha {_alpha_text(lora)}"


def _alpha_text(lora: dict) -> str:
    alpha = lora["alpha"]
    if alpha is None:
        text = "none stored (= rank)" if not lora.get("alpha_note") else "unknown"
    elif isinstance(alpha, list):
        text = "[" + ", ".join(f"{a:g}" for a in alpha) + "]"
    else:
        text = f"{alpha:g}"
    return text + (f" ({lora['alpha_note']})" if lora.get("alpha_note") else "")


def _show_metadata(console: Console, metadata: dict) -> None:
    if not metadata:
        return
    table = Table(title="metadata", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for group in ("modelspec", "kohya"):
        for key, value in metadata.get(group, {}).items():
            table.add_row(key, value if len(value) < 200 else value[:200] + "…")
    for key in ("sd_merge_recipe", "sd_merge_models", "mergekit_sd.recipe"):
        if key in metadata:
            text = str(metadata[key])
            table.add_row(key, text if len(text) < 300 else text[:300] + "…")
    if metadata.get("other"):  # --verbose: the values too
        for key, value in metadata["other"].items():
            table.add_row(key, value if len(value) < 200 else value[:200] + "…")
    elif metadata.get("other_keys"):
        table.add_row("other keys", ", ".join(metadata["other_keys"]))
    console.print(table)
