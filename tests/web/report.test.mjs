// Unit tests of web/report.js with Node's built-in test runner (node --test tests/web/).
import assert from "node:assert/strict";
import { test } from "node:test";
import { PRESETS, applyPreset, grownSize, renderHTML, reportHeight, reportModel } from "../../web/report.js";

const ERASE = {
  concepts: ["nudity", "blood"], guides: [" ", " "], preserve: ["a cat"],
  params: { lamb: 0.1, erase_scale: 1, preserve_scale: 0.1, reg: 0.1, epochs: 2 },
  rounds: [
    { step: 0, reach: [0.6, 0.5], guide_gap: [0.05, 0.04], drift: { "": 0.01, "a cat": 0.02 } },
    { step: 1, reach: [0.55, 0.45], guide_gap: [0.5, 0.6], drift: { "": 0.012, "a cat": 0.03 } },
    { step: 2, reach: [0.5, 1.7], guide_gap: [0.4, 0.5], drift: { "": 0.013, "a cat": 0.031 } },
  ],
  rank: 300, dim: 768, seconds: 0.61, device: "cpu",
};

test("presets are the paper's and match rece_core", () => {
  assert.deepEqual(PRESETS.nudity, { reg: 0.1, rounds: 3 });
  assert.deepEqual(PRESETS.unsafe, { reg: 0.1, rounds: 2 });
  assert.deepEqual(PRESETS.artistic_style, { reg: 0.001, rounds: 1 });
  assert.deepEqual(PRESETS.object, { reg: 0.001, rounds: 1 });
});

test("choosing a kind fills reg and rounds; custom changes nothing", () => {
  const widgets = { reg: { value: 0.1 }, rounds: { value: 3 }, lamb: { value: 0.5 } };
  assert.equal(applyPreset("artistic_style", widgets), true);
  assert.equal(widgets.reg.value, 0.001);
  assert.equal(widgets.rounds.value, 1);
  assert.equal(widgets.lamb.value, 0.5);
  assert.equal(applyPreset("artistic_style", widgets), false);
  widgets.reg.value = 0.05; // the user can still change it afterwards
  assert.equal(applyPreset("custom", widgets), false);
  assert.equal(widgets.reg.value, 0.05);
});

test("erase report: one bar per concept and round, drift of the last round, time and device", () => {
  const m = reportModel("RECEEraseConcept", ERASE);
  assert.equal(m.bars.length, 6);
  assert.equal(m.bars[0].label, "erase · nudity");
  assert.equal(m.bars[5].label, "round 2 · blood");
  assert.equal(m.bars[5].value, 1); // clamped
  assert.equal(m.bars[2].text, "reach 55.0%");
  assert.ok(m.lines.some((l) => l.includes("“nudity”, “blood” → “∅”")));
  assert.ok(m.lines.some((l) => l.includes("preserving “a cat”")));
  assert.ok(m.lines.some((l) => l === "preserved drift ≤ 3.1%"));
  assert.ok(m.lines.some((l) => l === "0.61 s on cpu"));
});

test("derive and apply reports", () => {
  const d = reportModel("RECEDeriveEmbedding", { concept: "nudity", reg: 0.1, reach: 0.42, erasures: 1 });
  assert.deepEqual(d.bars, [{ label: "reach", value: 0.42, text: "42.0%" }]);
  const a = reportModel("RECEApplyErasedWeights", { concepts: ["x"], strength: 0.5, weights: 32, file: "e.safetensors",
    warning: "warning: other base" });
  assert.ok(a.lines.includes("“x” at strength 0.5"));
  assert.equal(a.warning, "warning: other base");
  assert.equal(reportModel("RECEEraseConcept", undefined), null);
});

test("HTML is escaped and bars have the value as width", () => {
  const html = renderHTML(reportModel("RECEEraseConcept", { ...ERASE, concepts: ["<script>x</script>", "b"] }));
  assert.ok(!html.includes("<script>"));
  assert.ok(html.includes("&lt;script&gt;"));
  assert.ok(html.includes('style="width:60.0%"'));
  assert.equal((html.match(/class="rece-bar"/g) || []).length, 6);
  assert.equal(renderHTML(null), "");
});

test("a node only grows to fit its report, in each direction separately", () => {
  assert.deepEqual(grownSize([320, 200], [210, 380]), [320, 380]); // keeps its width, gets taller
  assert.deepEqual(grownSize([320, 500], [210, 380]), [320, 500]); // never shrinks
  assert.deepEqual(grownSize([180, 100], [250, 90]), [250, 100]);
});

test("the report's height grows with its rows and is capped (it scrolls beyond)", () => {
  assert.ok(reportHeight(8) > reportHeight(4));
  assert.ok(reportHeight(0) > 0);
  assert.equal(reportHeight(1000), reportHeight(500));
});

test("few-shot unlearning report: concept, parameters, loss per epoch, time", () => {
  const m = reportModel("RECEFewShotUnlearnConcept", {
    concept: "Eiffel Tower", epoch_losses: [-0.1, -0.25], seconds: 8.04, parameters: 59000000,
    parameter_set: "mlp-final-attn", device: "cuda:0",
  });
  assert.equal(m.title, "Few-shot unlearning");
  assert.deepEqual(m.lines, ["unlearned “Eiffel Tower” · 59,000,000 parameters (mlp-final-attn)",
    "loss per epoch (−MSE): -0.1000, -0.2500", "8.0 s on cuda:0"]);
  assert.equal(reportModel("RECESaveUnlearning", { saved: "rece/u_00001.safetensors" }).lines[0],
    "saved rece/u_00001.safetensors");
});

test("ConceptPrune report: concepts, share, settings, one bar per layer scaled to the largest share", () => {
  const m = reportModel("ConceptPruneEraseConcept", {
    concepts: ["Van Gogh"], kind: "artist", pruned: 1234, share: 0.02, model_share: 0.0015,
    settings: { skill_ratio: 0.01, tau: 10, steps: 50, sampler: "euler", scheduler: "normal" },
    layers: [{ key: "input_blocks.1.1.transformer_blocks.0.ff.net.2", pruned: 100, share: 0.04 },
      { key: "middle_block.1.transformer_blocks.0.ff.net.2", pruned: 50, share: 0.01 }],
    seconds: 3.21, forward_calls: 20,
  });
  assert.equal(m.title, "ConceptPrune");
  assert.match(m.lines[0], /“Van Gogh” \(artist\)/);
  assert.match(m.lines[1], /1,234 weights: 2\.000% of the feed-forward outputs, 0\.1500% of the model/);
  assert.match(m.lines[2], /τ=10 of 50 steps/);
  assert.equal(m.bars.length, 2);
  assert.equal(m.bars[0].value, 1);
  assert.equal(m.bars[1].value, 0.25);
  assert.match(m.bars[1].text, /50 · 1\.00%/);
});

test("task-vector and Diverse Inversion reports: the α curve in α order, the top layers scaled to the first", () => {
  const r = { concept: "nudity", alpha: 0.19, found: true, curve: [[0.5, -3], [0.25, 0.4], [0.19, -0.1]],
    ranking: [["diffusion_model.a.weight", 4], ["diffusion_model.b.weight", 2]], layers: 12, edited: 12,
    source: "fine-tune", embeddings: ["rece/di_00001"], diversity: 0.3 };
  const m = reportModel("RECETaskVectorEraseConcept", r);
  assert.deepEqual(m.bars.slice(0, 3).map((b) => b.value), [0, 0.4, 0]);
  assert.equal(m.bars[3].label, "a.weight");
  assert.equal(m.bars[4].value, 0.5);
  assert.ok(m.lines.some((l) => l.includes("α = 0.190")) && m.warning === null);
  const d = reportModel("RECEDiverseInversion", { ...r, found: false });
  assert.ok(d.lines.includes("embedding:rece/di_00001") && d.warning);
  assert.ok(renderHTML(d).includes("Diverse Inversion"));
});
