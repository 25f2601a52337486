// RECE for ComfyUI: the canvas report of the RECE nodes and the concept-kind presets.
import { app } from "../../scripts/app.js";
import { applyPreset, renderHTML, reportModel, STYLE } from "./report.js";

const NODES = new Set(["RECEEraseConcept", "RECEDeriveEmbedding", "RECEApplyErasedWeights",
  "RECESaveErasedWeights", "RECELoadErasedWeights", "RECEExportErasureAsLoRA"]);
const WIDGET = "rece_report";

function ensureStyle() {
  if (document.getElementById("rece-style")) return;
  const style = document.createElement("style");
  style.id = "rece-style";
  style.textContent = STYLE;
  document.head.appendChild(style);
}

function showReport(node, nodeType, payload) {
  const html = renderHTML(reportModel(nodeType, payload));
  if (!html) return;
  ensureStyle();
  let widget = node.widgets?.find((w) => w.name === WIDGET);
  if (!widget) {
    const element = document.createElement("div");
    element.className = "rece-report";
    widget = node.addDOMWidget(WIDGET, "rece_report", element, { serialize: false, hideOnZoom: false });
    widget.serialize = false; // never part of widgets_values: saved workflows keep their alignment
  }
  widget.element.innerHTML = html;
  const rows = widget.element.children.length;
  widget.computeSize = (width) => [width, Math.min(32 + rows * 20, 420)]; // wrapped lines need room
  node.setSize?.(node.computeSize());
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "rece.comfyui.report",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODES.has(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const payload = message?.rece_report?.[0];
      if (payload) showReport(this, nodeData.name, payload);
    };
    if (nodeData.name !== "RECEEraseConcept") return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      const kind = this.widgets?.find((w) => w.name === "concept_kind");
      if (kind) {
        const callback = kind.callback;
        // Only a user's choice fires the callback; loading a workflow restores its saved values.
        kind.callback = (value, ...rest) => {
          const widgets = Object.fromEntries((this.widgets || []).map((w) => [w.name, w]));
          applyPreset(value, widgets);
          callback?.call(kind, value, ...rest);
          this.setDirtyCanvas?.(true, true);
        };
      }
      return result;
    };
  },
});
