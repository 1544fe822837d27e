"""The page: ``info`` (what the loaded model allows, as JSON) and ``render_page`` (the HTML,
its controls built from that info with values valid for the model in hand).

Owns the HTML skeleton only; behaviour is ``static/app.js`` and looks are ``static/style.css``,
both served by the package itself (no CDN: the page works offline).  Knows nothing of HTTP.
"""

from __future__ import annotations

import html
import json
from typing import Any

from ..pipeline import Pipeline

__all__ = ["STATIC", "a1111_names", "default_prompts", "info", "render_page"]

STATIC = ("app.js", "style.css")


def a1111_names() -> dict[str, list[str]]:
    """Canonical sampler -> its A1111 / ComfyUI display names (those with a space or capital,
    without diffusers' ``...Scheduler`` class names and k-diffusion's ``k_`` names)."""
    from ..samplers import SAMPLERS

    out = {}
    for name, spec in SAMPLERS.items():
        out[name] = [
            a
            for a in spec.aliases
            if not a.endswith("Scheduler") and not a.startswith("k_") and a != a.lower()
        ]
    return out


def default_prompts(pipe: Pipeline, limit: int = 20) -> list[str]:
    """Example prompts of a text run (its data's class prompts or captions); [] if unknown."""
    if pipe.context_dim is None or not pipe.run_dir:
        return []
    try:
        from ..eval.sweep import text_run_prompts
        from ..runs import read_run_config

        prompts, _ = text_run_prompts(read_run_config(pipe.run_dir).get("data") or {})
        return prompts[:limit]
    except Exception:  # noqa: BLE001 - only a convenience: any data problem means no examples
        return []


def info(pipe: Pipeline, limits: dict[str, Any]) -> dict[str, Any]:
    """JSON of ``GET /info``: the run, image shape, conditioning, defaults, samplers, limits."""
    from ..samplers import SAMPLERS
    from ..schedules import SPACINGS

    c, h, w = pipe.pixel_shape
    return {
        "run": pipe.run_dir,
        "weights": pipe.weights,
        "image_shape": list(pipe.image_shape),
        "pixel_shape": [c, h, w],
        "size_multiple": pipe.downsample_factor,
        "latent": pipe.vae is not None,
        "num_classes": pipe.num_classes,
        "text": pipe.context_dim is not None,
        "prompts": default_prompts(pipe),
        "defaults": pipe.sample_defaults,
        "samplers": sorted(SAMPLERS),
        "a1111_names": a1111_names(),
        "spacings": list(SPACINGS),
        "lora": pipe.loras,
        "limits": {k: limits[k] for k in ("max_n", "max_steps", "max_side")},
    }


def _options(values: list[tuple[str, str]], selected: str) -> str:
    return "".join(
        f'<option value="{html.escape(v)}"{" selected" if v == selected else ""}>'
        f"{html.escape(label)}</option>"
        for v, label in values
    )


def _field(label: str, control: str, hint: str = "") -> str:
    title = f' title="{html.escape(hint)}"' if hint else ""
    return f"<label{title}><span>{html.escape(label)}</span>{control}</label>"


def _condition_fields(data: dict[str, Any]) -> str:
    k = data["num_classes"]
    if k:
        classes = [("mixed", f"mixed (0..{k - 1} in turn)")] + [(str(i), str(i)) for i in range(k)]
        negative = [("", "none (the null label)")] + [(str(i), str(i)) for i in range(k)]
        return _field(
            "class", f'<select name="class_labels">{_options(classes, "mixed")}</select>'
        ) + _field(
            "negative class", f'<select name="negative_class">{_options(negative, "")}</select>'
        )
    if data["text"]:
        prompt = html.escape(data["prompts"][0] if data["prompts"] else "")
        examples = "".join(f'<option value="{html.escape(p)}">' for p in data["prompts"])
        return _field(
            "prompt",
            f'<input name="prompt" list="prompts" value="{prompt}" size="40">'
            f'<datalist id="prompts">{examples}</datalist>',
        ) + _field("negative prompt", '<input name="negative_prompt" size="30">')
    return '<p class="hint">unconditional model</p>'


def render_page(pipe: Pipeline, limits: dict[str, Any]) -> str:
    """The whole page: Generate, Gallery, A/B and Sweeps tabs."""
    data = info(pipe, limits)
    d = data["defaults"]
    names = data["a1111_names"]
    samplers = [(s, s + (f" — {names[s][0]}" if names[s] else "")) for s in data["samplers"]]
    for s in data["samplers"]:
        samplers += [
            (a, f"{a} (A1111)") for a in names[s][1:] if "Karras" in a or "Exponential" in a
        ]
    if str(d["sampler"]) not in [v for v, _ in samplers]:  # a run's default given by an alias
        samplers.insert(0, (str(d["sampler"]), str(d["sampler"])))
    spacing = [("", "sampler's default")] + [(s, s) for s in data["spacings"]]
    _, h, w = data["pixel_shape"]
    f = data["size_multiple"]
    lim = data["limits"]
    cfg = "" if data["num_classes"] or data["text"] else " disabled"  # unconditional: no CFG
    default_cfg = d["guidance_scale"] if not cfg else 1.0
    generate = "".join(
        [
            _condition_fields(data),
            _field(
                "sampler",
                f'<select name="sampler">{_options(samplers, str(d["sampler"]))}</select>',
            ),
            _field("spacing", f'<select name="spacing">{_options(spacing, "")}</select>'),
            _field(
                "steps",
                f'<input name="steps" type="number" min="1" max="{lim["max_steps"]}" '
                f'value="{d["steps"]}">',
            ),
            _field(
                "CFG",
                f'<input name="guidance_scale" type="number" step="0.1" min="0" max="100" '
                f'value="{default_cfg}"{cfg}>',
                "classifier-free guidance scale",
            ),
            _field(
                "rescale",
                '<input name="guidance_rescale" type="number" step="0.05" min="0" '
                'max="1" value="0">',
                "guidance rescale φ (Lin et al. 2023)",
            ),
            _field(
                "guide σ from",
                '<input name="interval_lo" type="number" step="any" min="0" placeholder="0">',
                "guidance interval (Kynkäänniemi et al. 2024)",
            ),
            _field(
                "to σ",
                '<input name="interval_hi" type="number" step="any" min="0" placeholder="∞">',
            ),
            _field("APG", '<input name="apg" type="checkbox">', "adaptive projected guidance"),
            _field(
                "eta",
                '<input name="eta" type="number" step="0.1" min="0" max="10" '
                'placeholder="default">',
                "stochasticity of samplers that take it",
            ),
            _field(
                "seed", '<input name="seed" value="random" size="12">', '"random" or an integer'
            ),
            _field("n", f'<input name="n" type="number" min="1" max="{lim["max_n"]}" value="4">'),
            _field("per row", '<input name="nrow" type="number" min="1" placeholder="auto">'),
            _field(
                "height",
                f'<input name="height" type="number" min="{f}" step="{f}" '
                f'max="{lim["max_side"]}" value="{h}">',
            ),
            _field(
                "width",
                f'<input name="width" type="number" min="{f}" step="{f}" '
                f'max="{lim["max_side"]}" value="{w}">',
            ),
        ]
    )
    half = max(1, int(d["steps"]) // 2)
    run = html.escape(str(data["run"]))
    boot = html.escape(json.dumps(data), quote=True)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>difflab · {run}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="/static/style.css"></head>
<body data-info="{boot}">
<header><h1>difflab</h1><span class="run">{run} · {data["weights"] or ""} weights ·
image {h}×{w}</span>
<nav><button data-tab="generate" class="on">Generate</button>
<button data-tab="gallery">Gallery</button>
<button data-tab="ab">A/B</button><button data-tab="sweeps">Sweeps</button></nav></header>
<main>
<section id="generate" class="tab on">
<form id="gen-form" class="controls">{generate}
<div class="buttons"><button id="gen-go" type="submit">Generate</button>
<button id="gen-cancel" type="button" disabled>Cancel</button></div></form>
<div id="gen-status" class="status"><progress id="gen-bar" max="100" value="0"></progress>
<span id="gen-text">ready</span></div>
<p id="gen-error" class="error" role="alert" hidden></p>
<div class="images"><figure><img id="gen-preview" alt=""><figcaption>x̂0 preview</figcaption>
</figure>
<figure><img id="gen-result" alt=""><figcaption id="gen-caption">result</figcaption></figure></div>
</section>
<section id="gallery" class="tab">
<form id="gal-filter" class="controls"><label><span>prompt contains</span><input name="q"></label>
<label><span>class</span><input name="class" type="number" min="0"></label>
<button type="submit">Filter</button><span id="gal-count"></span></form>
<div id="gal-grid" class="grid"></div>
<div id="gal-detail" hidden><img id="gal-image" alt=""><pre id="gal-params"></pre>
<button id="gal-use">Use these settings</button> <button id="gal-delete">Delete</button>
<button id="gal-close">Close</button></div>
</section>
<section id="ab" class="tab">
<form id="ab-form" class="controls"><label><span>name</span><input name="name" value="A vs B">
</label>
<label><span>A (JSON)</span><input name="a" size="36" value='{{"sampler": "{d["sampler"]}"}}'>
</label>
<label><span>B (JSON)</span>
<input name="b" size="36" value='{{"sampler": "{d["sampler"]}", "steps": {half}}}'></label>
<button type="submit">New experiment</button>
<label><span>experiment</span><select id="ab-experiment"></select></label></form>
<p class="hint">A side may set sampler, steps, guidance_scale, guidance_rescale, guidance_interval,
apg, eta, spacing, weights ("ema" / "raw") and lora_scale. Keys: 1 left, 2 right,
3 tie, 4 both bad.</p>
<p id="ab-error" class="error" role="alert" hidden></p>
<div class="pair"><figure><img id="ab-left" alt="left">
<button data-vote="left">Left is better</button></figure>
<figure><img id="ab-right" alt="right"><button data-vote="right">Right is better</button>
</figure></div>
<div class="buttons"><button data-vote="tie">Tie</button>
<button data-vote="both_bad">Both bad</button>
<span id="ab-status"></span></div>
<h2>Ranking <a href="/api/ab/ranking.csv" id="ab-csv">CSV</a></h2><table id="ab-ranking"></table>
</section>
<section id="sweeps" class="tab"><div id="sweep-list"><p class="hint">loading…</p></div></section>
</main><script src="/static/app.js"></script></body></html>"""
