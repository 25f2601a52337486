// Pure logic of the canvas report and the concept-kind presets (no DOM, no ComfyUI import),
// unit-tested with Node's test runner in tests/web/.

/** The paper's tuned values per concept kind (rece_core.PRESETS). "custom" has none. */
export const PRESETS = Object.freeze({
  nudity: { reg: 0.1, rounds: 3 },
  unsafe: { reg: 0.1, rounds: 2 },
  artistic_style: { reg: 0.001, rounds: 1 },
  object: { reg: 0.001, rounds: 1 },
});

/** Fill the reg/rounds widgets with the paper's values for `kind`; returns whether anything was set. */
export function applyPreset(kind, widgets) {
  const preset = PRESETS[kind];
  if (!preset) return false;
  let changed = false;
  for (const [name, value] of Object.entries(preset)) {
    const w = widgets[name];
    if (w && w.value !== value) {
      w.value = value;
      changed = true;
    }
  }
  return changed;
}

/** The report's height in px for `rows` children (wrapped lines need room; long reports scroll). */
export function reportHeight(rows) {
  return Math.min(32 + Math.max(1, rows) * 20, 420);
}

/** The size a node needs, never smaller than it is: a node only grows to fit its report. */
export function grownSize(current, needed) {
  return [Math.max(current[0], needed[0]), Math.max(current[1], needed[1])];
}

const clamp01 = (x) => Math.max(0, Math.min(1, Number(x) || 0));
const pct = (x) => `${(100 * clamp01(x)).toFixed(1)}%`;
const quote = (xs) => (xs || []).map((x) => `“${x.trim() || "∅"}”`).join(", ");

/** A view model of a node's `ui.rece_report[0]` payload: a title, text lines and bars in [0, 1]. */
export function reportModel(nodeType, r) {
  if (!r) return null;
  if (nodeType === "RECEEraseConcept") {
    const guides = [...new Set(r.guides || [])];
    const lines = [
      `erased ${quote(r.concepts)} → ${quote(guides)}`,
      r.preserve?.length ? `preserving ${quote(r.preserve)}` : null,
      `${r.params?.epochs ?? 0} round(s) · ρ=${r.params?.reg} · λ=${r.params?.lamb} · rank ${r.rank}/${r.dim}`,
      `${Number(r.seconds).toFixed(2)} s on ${r.device}`,
    ].filter(Boolean);
    const bars = [];
    (r.rounds || []).forEach((round) => {
      (round.reach || []).forEach((value, i) => {
        const concept = r.concepts?.[i] ?? `#${i}`;
        const step = round.step === 0 ? "erase" : `round ${round.step}`;
        bars.push({ label: `${step} · ${concept}`, value: clamp01(value), text: `reach ${pct(value)}` });
      });
    });
    const last = (r.rounds || []).at(-1);
    const drift = last ? Math.max(0, ...Object.values(last.drift || {})) : 0;
    lines.push(`preserved drift ≤ ${pct(drift)}`);
    return { title: "RECE erasure", lines, bars, warning: null };
  }
  if (nodeType === "RECEDeriveEmbedding") {
    return {
      title: "RECE derived embedding",
      lines: [`${quote([r.concept])} with ρ=${r.reg} over ${r.erasures} erasure(s)`],
      bars: [{ label: "reach", value: clamp01(r.reach), text: pct(r.reach) }],
      warning: null,
    };
  }
  if (nodeType === "RECEApplyErasedWeights") {
    return {
      title: "RECE applied",
      lines: [`${quote(r.concepts)} at strength ${r.strength}`, r.file ? `from ${r.file}` : null,
        `${r.weights} weights that read the text`].filter(Boolean),
      bars: [],
      warning: r.warning || null,
    };
  }
  if (nodeType === "RECEFewShotUnlearnConcept") {
    const losses = (r.epoch_losses || []).map((x) => Number(x).toFixed(4)).join(", ");
    return {
      title: "Few-shot unlearning",
      lines: [`unlearned ${quote([r.concept])} · ${Number(r.parameters).toLocaleString("en")} parameters (${r.parameter_set})`,
        `loss per epoch (−MSE): ${losses}`, `${Number(r.seconds).toFixed(1)} s on ${r.device}`],
      bars: [],
      warning: null,
    };
  }
  if (nodeType === "ConceptPruneEraseConcept" || nodeType === "ConceptPruneApply") {
    const s = r.settings || {};
    const lines = [
      `pruned ${quote(r.concepts)} (${r.kind})${r.strength !== undefined ? ` at strength ${r.strength}` : ""}`,
      `${Number(r.pruned).toLocaleString("en")} weights: ${(100 * Number(r.share || 0)).toFixed(3)}% of the ` +
        `feed-forward outputs, ${(100 * Number(r.model_share || 0)).toFixed(4)}% of the model`,
      s.tau !== undefined ? `skill ratio ${s.skill_ratio} · τ=${s.tau} of ${s.steps} steps · ${s.sampler}/${s.scheduler}` : null,
      r.forward_calls ? `${r.forward_calls} forward calls · ${Number(r.seconds).toFixed(1)} s` : null,
    ].filter(Boolean);
    // a layer's share is small (≈ skill ratio × τ at most): bars are scaled to the largest layer's share
    const top = Math.max(1e-12, ...(r.layers || []).map((l) => Number(l.share) || 0));
    const bars = (r.layers || []).map((l) => ({
      label: l.key, value: clamp01((Number(l.share) || 0) / top),
      text: `${l.pruned} · ${(100 * (Number(l.share) || 0)).toFixed(2)}%`,
    }));
    return { title: "ConceptPrune", lines, bars, warning: null };
  }
  if (nodeType === "RECETaskVectorEraseConcept" || nodeType === "RECEDiverseInversion") {
    const alpha = Number(r.alpha) || 0;
    const lines = nodeType === "RECETaskVectorEraseConcept"
      ? [`θ − α·τ on ${r.edited} of ${r.layers} layers, α = ${alpha.toFixed(3)}`, `τ from ${r.source}`]
      : [`${(r.embeddings || []).length} embedding(s) of ${quote([r.concept])}`,
        ...(r.embeddings || []).slice(0, 4).map((n) => `embedding:${n}`),
        `diversity ${Number(r.diversity).toFixed(3)} (mean cosine of offsets)`];
    if (r.found === true) lines.push(`the set stops reaching the concept at α = ${alpha.toFixed(3)}`);
    if (r.found === false) lines.push(`warning: the set still reaches the concept at α = ${alpha.toFixed(3)}`);
    const bars = [...(r.curve || [])].sort((a, b) => a[0] - b[0]).map(([a, reach]) => (
      { label: `reach at α = ${Number(a).toFixed(2)}`, value: clamp01(reach), text: pct(reach) }));
    const top = Math.max(1e-12, ...(r.ranking || []).map((x) => Number(x[1]) || 0));
    (r.ranking || []).slice(0, 5).forEach(([key, score]) => bars.push(
      { label: String(key).replace(/^diffusion_model\./, ""), value: clamp01(score / top), text: Number(score).toPrecision(3) }));
    return { title: nodeType === "RECEDiverseInversion" ? "Diverse Inversion" : "Task vector erasure", lines, bars,
      warning: r.found === false ? "raise alpha_max or train τ longer" : null };
  }
  const text = r.saved ? `saved ${r.saved}` : r.loaded ? `loaded ${r.loaded}` : r.exported ? `exported ${r.exported}` : "";
  return { title: "RECE", lines: [text].filter(Boolean), bars: [], warning: null };
}

const escapeHtml = (s) => String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);

/** HTML for the view model: escaped text, one bar per entry (its width is the value). */
export function renderHTML(model) {
  if (!model) return "";
  const lines = model.lines.map((l) => `<div class="rece-line">${escapeHtml(l)}</div>`).join("");
  const bars = model.bars.map((b) =>
    `<div class="rece-bar" title="${escapeHtml(b.text)}"><span class="rece-bar-label">${escapeHtml(b.label)}</span>` +
    `<span class="rece-bar-track"><span class="rece-bar-fill" style="width:${(100 * clamp01(b.value)).toFixed(1)}%"></span></span>` +
    `<span class="rece-bar-text">${escapeHtml(b.text)}</span></div>`).join("");
  const warning = model.warning ? `<div class="rece-warning">${escapeHtml(model.warning)}</div>` : "";
  return `<div class="rece-title">${escapeHtml(model.title)}</div>${lines}${bars}${warning}`;
}

export const STYLE = `
.rece-report{font:11px/1.35 sans-serif;color:var(--input-text,#ddd);padding:4px 6px;overflow:auto}
.rece-title{font-weight:bold;margin-bottom:2px}
.rece-bar{display:flex;align-items:center;gap:4px;margin:1px 0}
.rece-bar-label{flex:0 0 45%;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.rece-bar-track{flex:1;height:8px;background:rgba(128,128,128,.3);border-radius:4px;overflow:hidden}
.rece-bar-fill{display:block;height:100%;background:#d9534f}
.rece-bar-text{flex:0 0 auto;min-width:5.5em;text-align:right}
.rece-warning{color:#f0ad4e;margin-top:2px}`;
