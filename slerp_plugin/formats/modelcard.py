"""The README.md model card of a merged model: YAML front matter that parses, then the facts."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from .manifest import Manifest


def render_model_card(manifest: Manifest, config_yaml: str | None = None,
                      evaluation: dict[str, Any] | None = None) -> str:
    """Markdown with front matter (``base_model``: both parents, tags, ``library_name``);
    ``config_yaml`` (a mergekit config) is quoted when given; ``evaluation`` (the gate's
    ``perplexity`` by role, ``threshold``, ``margin``, ``tokens``, ``eval_text``, ``passed``) adds an
    evaluation section. Never touches the network."""
    spec = manifest.spec
    m1, m2 = manifest.inputs["model_1"], manifest.inputs["model_2"]
    front = {
        "base_model": [m1.ref, m2.ref],
        "library_name": "transformers",
        "tags": ["merge", "slerp", "slerp_plugin"]
        + (["mergekit"] if manifest.tool.get("engine") == "mergekit" else []),
    }
    engine = (
        "mergekit (`merge_method: slerp_for_causal_lm`)"
        if manifest.tool.get("engine") == "mergekit" else "the slerp_plugin streaming engine"
    )
    counts = ", ".join(f"{k} {v}" for k, v in sorted(manifest.branch_counts.items()))
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        "",
        "# SLERP merge",
        "",
        f"This model is a spherical linear interpolation (SLERP) of two causal language models, "
        f"made with slerp_plugin {manifest.tool.get('version', '')} via {engine}, using FusionBench "
        "`SlerpForCausalLM` semantics.",
        "",
        "## Parents",
        "",
        "| role | model | revision |",
        "|---|---|---|",
        f"| model_1 (t = 0) | {m1.ref} | {m1.revision or '-'} |",
        f"| model_2 (t = 1) | {m2.ref} | {m2.revision or '-'} |",
        "",
        "## Parameters",
        "",
        "| parameter | value |",
        "|---|---|",
        f"| t | {_t_text(spec.get('t', '-'))} |",
        f"| DOT_THRESHOLD | {spec.get('DOT_THRESHOLD', '-')} |",
        f"| epsilon | {spec.get('epsilon', '-')} |",
        f"| dtype | {spec.get('out_dtype') or spec.get('dtype') or 'as model_1'} |",
        f"| tokenizer | {manifest.inputs['tokenizer'].ref} |",
        "",
        f"Tensors per branch: {counts}.",
        "",
        "`merge_manifest.json` holds the input checksums, per-tensor branches and timings.",
        "",
    ]
    if config_yaml:
        lines += ["## Configuration", "", "```yaml", config_yaml.rstrip(), "```", ""]
    if evaluation:
        lines += _evaluation_lines(evaluation)
    if manifest.warnings:
        lines += ["## Warnings", ""] + [f"- {w}" for w in manifest.warnings] + [""]
    return "\n".join(lines)


def _evaluation_lines(ev: dict[str, Any]) -> list[str]:
    ppl = ev.get("perplexity") or {}
    text = f" of {ev['eval_text']}" if ev.get("eval_text") else ""
    lines = ["## Evaluation", "",
             f"Perplexity on {ev.get('tokens', '?')} tokens{text} (lower is better), measured before "
             "publishing; `validation.json` holds the full report.", "",
             "| model | perplexity |", "|---|---:|"]
    lines += [f"| {role} | {ppl[role]:.4f} |" for role in ("merged", "model_1", "model_2") if role in ppl]
    if ev.get("threshold") is not None:
        verdict = "passed" if ev.get("passed") else "failed"
        lines += ["", f"Gate: the merge's perplexity at most the worse parent's + {ev.get('margin', 0):.0%} "
                      f"(≤ {ev['threshold']:.4f}): {verdict}."]
    return [*lines, ""]


def _t_text(t: object) -> str:
    if not isinstance(t, list):
        return str(t)
    parts = []
    for e in t:
        if isinstance(e, dict):
            parts.append(f"{e.get('filter') or 'other'}: {e['value']}")
        else:
            parts.append(str(e))
    return "; ".join(parts) if all(isinstance(e, dict) for e in t) else f"gradient {t}"


def parse_front_matter(text: str) -> dict:
    """The YAML front matter of a model card (``---`` fenced), as a dict."""
    if not text.startswith("---\n"):
        raise ValueError("model card has no front matter")
    end = text.index("\n---", 4)
    data = yaml.safe_load(text[4:end])
    if not isinstance(data, dict):
        raise ValueError("model card front matter is not a mapping")
    return data
