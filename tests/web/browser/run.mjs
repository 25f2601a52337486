// Drive ComfyUI's real frontend in headless Chromium (Debian's, never a downloaded browser):
// load an example workflow, shrink it for a CPU (64×64, 2 steps), queue it, wait for the RECE
// report on the canvas, screenshot it, then check the concept-kind preset rule.
// usage: node run.mjs <url> <workflow.json> <screenshot.png>
import { readFileSync } from "node:fs";
import { chromium } from "playwright-core";

const [url, workflowPath, shot] = process.argv.slice(2);
const workflow = JSON.parse(readFileSync(workflowPath, "utf8"));
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const result = {};
try {
  const page = await browser.newPage({ viewport: { width: 1800, height: 1000 } });
  page.on("pageerror", (e) => console.error("pageerror:", e.message));
  await page.goto(url);
  await page.waitForFunction(() => window.comfyAPI?.app?.app?.graph && window.LiteGraph?.registered_node_types?.RECEEraseConcept, null, { timeout: 120000 });
  await page.evaluate(async (wf) => {
    const app = window.comfyAPI.app.app;
    await app.loadGraphData(wf);
    for (const node of app.graph._nodes) {
      const w = Object.fromEntries((node.widgets || []).map((x) => [x.name, x]));
      if (node.type === "EmptyLatentImage") { w.width.value = 64; w.height.value = 64; }
      if (node.type === "KSampler") { w.steps.value = 2; }
    }
    await app.queuePrompt(0, 1);
  }, workflow);
  const expected = Number(process.env.RECE_REPORTS || 2); // RECE nodes in the workflow
  await page.waitForFunction((n) => document.querySelectorAll(".rece-report .rece-bar").length > 0 &&
    document.querySelectorAll(".rece-report").length >= n, expected, { timeout: 300000 });
  await page.waitForTimeout(500);
  result.reports = await page.$$eval(".rece-report", (els) => els.map((e) => e.innerText));
  await page.keyboard.press("Escape"); // the first-run template dialog
  await page.evaluate(() => {
    const app = window.comfyAPI.app.app;
    const node = app.graph._nodes.find((n) => n.type === "RECEEraseConcept");
    app.canvas.ds.scale = 1;
    app.canvas.ds.offset = [40 - node.pos[0], 60 - node.pos[1]];
    app.canvas.setDirty(true, true);
  });
  await page.waitForTimeout(800);
  await page.screenshot({ path: shot });
  result.preset = await page.evaluate(() => {
    const app = window.comfyAPI.app.app;
    const node = app.graph._nodes.find((n) => n.type === "RECEEraseConcept");
    const w = Object.fromEntries(node.widgets.map((x) => [x.name, x]));
    const before = { reg: w.reg.value, rounds: w.rounds.value };
    w.concept_kind.value = "artistic_style";
    w.concept_kind.callback("artistic_style");
    const after = { reg: w.reg.value, rounds: w.rounds.value };
    const saved = node.serialize().widgets_values;
    return { before, after, saved };
  });
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
