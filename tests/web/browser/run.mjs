// Drive ComfyUI's real frontend in headless Chromium (Debian's, never a downloaded browser), as a
// user would: load an example workflow, shrink it for a CPU (64×64, 2 steps), queue it, wait for
// the RECE reports on the nodes, measure where they are drawn, open the properties panel (where the
// frontend has one), choose a concept kind in the dropdown, and take screenshots.
// usage: node run.mjs <url> <workflow.json> <out-dir> <label> <classic|nodes2>
// prints one JSON line with what was seen.
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { chromium } from "playwright-core";

const [url, workflowPath, outDir, label, mode] = process.argv.slice(2);
const vue = mode === "nodes2";
const workflow = JSON.parse(readFileSync(workflowPath, "utf8"));
const ERASE = 2; // node ids in the workflow
const DERIVE = 3;

// Settings go through ComfyUI's own settings API before the page loads, as a user's saved settings do.
const settings = { "Comfy.VueNodes.Enabled": vue, "Comfy.TutorialCompleted": true };
const posted = await fetch(`${url}/settings`, { method: "POST", body: JSON.stringify(settings) });
if (!posted.ok) throw new Error(`POST /settings: ${posted.status}`);

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const result = { label, mode, console: [] };
const shot = (name) => join(outDir, `web_${label}_${mode}${name}.png`);
try {
  const page = await browser.newPage({ viewport: { width: 1800, height: 1000 } });
  page.on("pageerror", (e) => result.console.push(`pageerror: ${e.stack || e.message}`));
  page.on("console", (m) => { if (m.type() === "error" || m.type() === "warning") result.console.push(`${m.type()}: ${m.text()}`); });
  await page.goto(url);
  // The frontend restores its saved workflow while the splash is up and replaces the node objects
  // then: touch app.graph only once the splash has gone.
  await page.waitForFunction(() => {
    const splash = document.getElementById("splash-loader");
    const gone = !splash || !splash.isConnected || getComputedStyle(splash).display === "none" || splash.offsetParent === null;
    return gone && window.comfyAPI?.app?.app?.graph && window.LiteGraph?.registered_node_types?.RECEEraseConcept;
  }, null, { timeout: 120000 });
  await page.waitForTimeout(1000);
  await page.keyboard.press("Escape"); // a first-run dialog, if any
  result.frontend = await page.evaluate(() => window.__COMFYUI_FRONTEND_VERSION__ ?? null);
  await page.evaluate(async () => {
    const setting = window.comfyAPI.app.app.extensionManager.setting;
    if (setting.get("Comfy.RightSidePanel.IsOpen")) await setting.set("Comfy.RightSidePanel.IsOpen", false);
  });
  result.vueNodes = await page.evaluate(() => window.comfyAPI.app.app.extensionManager?.setting?.get?.("Comfy.VueNodes.Enabled") ?? null);

  await page.evaluate(async ([wf, vue]) => {
    const app = window.comfyAPI.app.app;
    await app.loadGraphData(wf);
    for (const node of app.graph.nodes) {
      const w = Object.fromEntries((node.widgets || []).map((x) => [x.name, x]));
      if (node.type === "EmptyLatentImage") { w.width.value = 64; w.height.value = 64; }
      if (node.type === "KSampler") { w.steps.value = 2; }
      // ComfyUI sends no report for a node whose output is cached: the second run on a server
      // changes an input of the erase node (and its report gains a line).
      if (node.type === "RECEEraseConcept" && vue) { w.preserve.value = "a cat"; }
    }
  }, [workflow, vue]);
  // Frame the two RECE nodes in the middle of the window, clear of the sidebar.
  await page.evaluate((id) => {
    const app = window.comfyAPI.app.app;
    const node = app.graph.getNodeById(id);
    app.canvas.ds.scale = 1;
    app.canvas.ds.offset = [420 - node.pos[0], 140 - node.pos[1]];
    app.canvas.setDirty(true, true);
  }, ERASE);
  await page.waitForTimeout(500);
  const sizeOf = (id) => page.evaluate((i) => [...window.comfyAPI.app.app.graph.getNodeById(i).size], id);
  result.sizeBefore = { erase: await sizeOf(ERASE), derive: await sizeOf(DERIVE) };
  await page.evaluate(() => window.comfyAPI.app.app.queuePrompt(0, 1));
  await page.waitForFunction(() => document.querySelectorAll(".rece-report .rece-bar").length > 0 &&
    document.querySelectorAll(".rece-report").length >= 2, null, { timeout: 300000 }).catch(async (e) => {
    await page.screenshot({ path: shot("_failed") });
    result.state = await page.evaluate(() => window.comfyAPI.app.app.graph.nodes.map((n) => [n.id, n.type, (n.widgets || []).map((w) => w.name)]));
    writeFileSync(join(outDir, `web_${label}_${mode}.json`), JSON.stringify(result, null, 1));
    throw e;
  });
  await page.evaluate(() => window.comfyAPI.app.app.canvas.setDirty(true, true));
  await page.waitForTimeout(1000);
  result.sizeAfter = { erase: await sizeOf(ERASE), derive: await sizeOf(DERIVE) };
  result.reports = await page.$$eval(".rece-report", (els) => els.map((e) => e.innerText));

  // Where each report is drawn, against the node's box as the user sees it (screen pixels).
  const bounds = () => page.evaluate(([ids, vue]) => {
    const app = window.comfyAPI.app.app;
    const out = {};
    for (const id of ids) {
      const node = app.graph.getNodeById(id);
      const widget = node.widgets?.find((w) => w.name === "rece_report");
      const el = widget?.element;
      if (!el) { out[id] = null; continue; }
      let box;
      if (vue) {
        const r = document.querySelector(`[data-node-id="${id}"]`)?.getBoundingClientRect();
        box = r && { left: r.left, top: r.top, right: r.right, bottom: r.bottom };
      } else {
        const c = app.canvas.canvas.getBoundingClientRect();
        const { offset, scale } = app.canvas.ds;
        const title = window.LiteGraph.NODE_TITLE_HEIGHT;
        box = { left: c.left + (node.pos[0] + offset[0]) * scale, top: c.top + (node.pos[1] - title + offset[1]) * scale,
          right: c.left + (node.pos[0] + node.size[0] + offset[0]) * scale, bottom: c.top + (node.pos[1] + node.size[1] + offset[1]) * scale };
      }
      const r = el.getBoundingClientRect();
      const style = getComputedStyle(el);
      out[id] = { node: box, report: { left: r.left, top: r.top, right: r.right, bottom: r.bottom },
        visible: r.width > 0 && r.height > 0 && style.display !== "none" && style.visibility !== "hidden",
        overflowX: el.scrollWidth - el.clientWidth, inPanel: !!el.closest('[data-testid="properties-panel"]') };
    }
    return out;
  }, [[ERASE, DERIVE], vue]);
  result.bounds = await bounds();
  await page.screenshot({ path: shot("") });

  // The properties panel (frontends that have one): select the erase node and open it.
  result.panel = null;
  // Frontends without the panel (1.27) do not know its setting.
  const PANEL = "Comfy.RightSidePanel.IsOpen";
  const hasPanel = await page.evaluate(async ([id, key]) => {
    const app = window.comfyAPI.app.app;
    if (app.extensionManager.setting.get(key) === undefined) return false;
    app.canvas.selectNode(app.graph.getNodeById(id));
    await app.extensionManager.setting.set(key, true);
    return true;
  }, [ERASE, PANEL]);
  if (hasPanel) {
    const panel = await page.waitForSelector('[data-testid="properties-panel"]', { timeout: 15000 }).catch(() => null);
    if (panel) {
      await page.waitForTimeout(1000);
      result.panel = {
        text: await panel.innerText(),
        reports: await panel.$$eval(".rece-report", (els) => els.length),
        boundsOpen: await bounds(),
      };
      await page.screenshot({ path: shot("_panel") });
      await page.evaluate((key) => window.comfyAPI.app.app.extensionManager.setting.set(key, false), PANEL);
      await page.waitForTimeout(800);
      await page.evaluate(() => window.comfyAPI.app.app.canvas.setDirty(true, true));
      await page.waitForTimeout(500);
      result.panel.boundsClosed = await bounds();
    }
  }

  // Presets: choose "artistic_style" in the concept_kind dropdown, as a user does.
  const values = () => page.evaluate((id) => {
    const w = Object.fromEntries(window.comfyAPI.app.app.graph.getNodeById(id).widgets.map((x) => [x.name, x.value]));
    return { concept_kind: w.concept_kind, reg: w.reg, rounds: w.rounds };
  }, ERASE);
  const before = await values();
  await page.evaluate(() => window.comfyAPI.app.app.canvas.deselectAll?.());
  if (vue) {
    await page.click(`[data-node-id="${ERASE}"] button[role="combobox"][aria-label="concept_kind"]`);
    await page.click('[role="option"]:has-text("artistic_style")');
  } else {
    const at = await page.evaluate((id) => {
      const app = window.comfyAPI.app.app;
      const node = app.graph.getNodeById(id);
      const w = node.widgets.find((x) => x.name === "concept_kind");
      const c = app.canvas.canvas.getBoundingClientRect();
      const { offset, scale } = app.canvas.ds;
      const h = w.computedHeight || window.LiteGraph.NODE_WIDGET_HEIGHT;
      return [c.left + (node.pos[0] + node.size[0] / 2 + offset[0]) * scale, c.top + (node.pos[1] + w.y + h / 2 + offset[1]) * scale];
    }, ERASE);
    await page.mouse.click(at[0], at[1]);
    await page.click('.litecontextmenu .litemenu-entry:has-text("artistic_style")');
  }
  await page.waitForTimeout(500);
  const after = await values();
  const saved = await page.evaluate((id) => window.comfyAPI.app.app.graph.getNodeById(id).serialize().widgets_values, ERASE);
  result.preset = { before, after, saved };
  await page.screenshot({ path: shot("_preset") });
} finally {
  await browser.close();
}
writeFileSync(join(outDir, `web_${label}_${mode}.json`), JSON.stringify(result, null, 1));
console.log(JSON.stringify(result));
