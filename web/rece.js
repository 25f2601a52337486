// RECE for ComfyUI: the canvas report of the RECE nodes and the concept-kind presets.
import { app } from "../../scripts/app.js";
import { applyPreset, grownSize, renderHTML, reportHeight, reportModel, STYLE } from "./report.js";

const NODES = new Set(["RECEEraseConcept", "RECEDeriveEmbedding", "RECEApplyErasedWeights",
  "RECESaveErasedWeights", "RECELoadErasedWeights", "RECEExportErasureAsLoRA",
  "RECEFewShotUnlearnConcept", "RECESaveUnlearning", "RECELoadUnlearning", "RECEExportUnlearningAsLoRA",
  "ConceptPruneEraseConcept", "ConceptPruneApply", "ConceptPruneSave", "ConceptPruneLoad", "ConceptPruneExportLoRA",
  "RECETaskVectorEraseConcept", "RECEDiverseInversion"]);
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
    const height = () => reportHeight(element.children.length);
    // DOM-widget options, read by the classic canvas and by Nodes 2.0 alike: the height comes from
    // getMinHeight/getHeight (not a computeSize override), and the report stays out of the
    // properties panel (it is an output, not an input to edit).
    widget = node.addDOMWidget(WIDGET, "rece_report", element, {
      serialize: false, hideOnZoom: false, hideInPanel: true, getMinHeight: height, getHeight: height,
    });
    widget.serialize = false; // never part of widgets_values: saved workflows keep their alignment
  }
  widget.element.innerHTML = html;
  // Grow the node to fit the report, never shrink it below the size the user (or the workflow) gave it.
  if (node.computeSize && node.setSize && node.size) {
    const size = grownSize(node.size, node.computeSize());
    if (size[0] !== node.size[0] || size[1] !== node.size[1]) node.setSize(size);
  }
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
