"""`--html`: a static page of a render's contact sheet (and A/B pairs), linking the PNGs."""

from __future__ import annotations

from html import escape
from urllib.parse import quote

from mergekit_sd.render.folder import PAGE_NAME
from mergekit_sd.render.runner import RenderResult

_STYLE = """
body { background: #181818; color: #e6e6e6; font: 14px system-ui, sans-serif; margin: 1em; }
table { border-collapse: collapse; }
th, td { padding: 4px; vertical-align: top; text-align: left; }
img { width: 256px; image-rendering: auto; display: block; }
img.ab { width: auto; max-width: 100%; }
.prompt { max-width: 16em; font-size: 12px; color: #aaa; }
code { color: #9cf; }
"""


def write_html(result: RenderResult) -> str:
    manifest = result.manifest
    grid = manifest.grid
    labels = [c.label for c in result.candidates]
    head = "".join(f"<th>{escape(label)}</th>" for label in labels)
    rows = []
    for prompt in grid["prompts"]:
        for seed in grid["seeds"]:
            cells = []
            for label in labels:
                file = result.image_file(label, prompt["name"], seed).relative_to(result.out)
                href = escape(quote(file.as_posix()))
                cells.append(f'<td><a href="{href}"><img loading="lazy" src="{href}" '
                             f'alt="{escape(label)}"></a></td>')
            rows.append(f'<tr><th>{escape(prompt["name"])}<br>seed {seed}'
                        f'<div class="prompt">{escape(prompt["text"])}</div></th>'
                        + "".join(cells) + "</tr>")
    settings = ", ".join(f"{p.family}: {p.preset} / {p.scheduler}, {p.steps} steps, "
                         f"guidance {p.guidance:g}" for p in manifest.pipelines)
    parts = [f"<!doctype html><meta charset=utf-8><title>{escape(grid['name'])}</title>",
             f"<style>{_STYLE}</style>",
             f"<h1>{escape(grid['name'])}</h1>",
             f"<p>{escape(settings)} on <code>{escape(manifest.device)}</code>; "
             f'<a href="manifest.json">manifest</a>, '
             f'<a href="{escape(manifest.sheets["contact"])}">contact sheet</a></p>',
             f"<table><tr><th></th>{head}</tr>{''.join(rows)}</table>"]
    pairs = manifest.sheets.get("ab")
    if pairs:
        parts.append("<h2>A/B</h2>")
        for pair in pairs:
            mean = pair.get("mean_abs_difference")
            note = f" (mean |A-B| {mean:g})" if mean is not None else ""
            parts.append(f'<p>{escape(pair["prompt_name"])}, seed {pair["seed"]}{note}</p>'
                         f'<img class="ab" loading="lazy" src="{escape(quote(pair["file"]))}">')
    result.folder.write(PAGE_NAME, "\n".join(parts).encode("utf-8"))
    manifest.sheets["html"] = PAGE_NAME
    result.folder.write_manifest(manifest)
    result.folder.sync()
    return PAGE_NAME
