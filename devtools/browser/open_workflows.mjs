// Open UI-format workflows in the ComfyUI frontend that a running server serves, the way a user does, and report
// what the frontend made of them. One headless Chromium for all workflows.
//
//   node open_workflows.mjs --url http://127.0.0.1:8188 --out report.json [--screenshots DIR]
//        [--place-files files.json] [--help-nodes A,B] a.json b.json ...
//
// The report is raw facts (node boxes, slots, widgets, links, graphToPrompt, the dialogs that opened);
// devtools/frontend.py judges them. --place-files: after the first pass, create the (empty) files listed in the JSON
// array, load every workflow again and report the dialogs that open then (report.reloaded). --help-nodes: open the
// node help panel of each node type and report what it rendered (report.help).
// The browser is the Chromium binary shipped inside @sparticuz/chromium (unpacked to /tmp on first use, nothing is
// downloaded); CHROMIUM_PATH selects another Chromium instead (e.g. Debian's /usr/bin/chromium).
import fs from "node:fs";
import path from "node:path";
import { parseArgs } from "node:util";
import puppeteer from "puppeteer-core";

const { values: opts, positionals: workflows } = parseArgs({
  allowPositionals: true,
  options: {
    url: { type: "string" },
    out: { type: "string" },
    screenshots: { type: "string" },
    width: { type: "string", default: "1600" },
    height: { type: "string", default: "1000" },
    "place-files": { type: "string" },
    "help-nodes": { type: "string" },
  },
});
if (!opts.url || !opts.out) {
  console.error("usage: node open_workflows.mjs --url URL --out report.json [--screenshots DIR] workflow.json ...");
  process.exit(2);
}

// Settings of a fresh user that would cover the canvas: the template browser opens on first start, the minimap and
// the render statistics sit on top of the graph. Newer frontends (1.5x) default to a redesigned node library without
// the help panel of the classic one; the classic one is kept, so the same help panel is opened in every version (the
// redesign's node info reads the same pages through the same NodeHelpService).
const QUIET_SETTINGS = {
  "Comfy.TutorialCompleted": true,
  "Comfy.Minimap.Visible": false,
  "Comfy.Graph.CanvasInfo": false,
  "Comfy.NodeLibrary.NewDesign": false,
};

async function launchBrowser() {
  let executablePath = process.env.CHROMIUM_PATH;
  let args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
              "--disable-sync", "--no-first-run", "--disable-dev-shm-usage", "--font-render-hinting=none"];
  if (!executablePath) {
    const chromium = (await import("@sparticuz/chromium")).default;
    executablePath = await chromium.executablePath();
    args = [...new Set([...chromium.args.filter((a) => a !== "--single-process"), ...args])];
  }
  // ANALOGY_FRONTEND_GC_STRESS=1: collect garbage in the page every few milliseconds, to surface promises that only
  // settle when the collector happens to run late (CI's "Promise was collected").
  if (process.env.ANALOGY_FRONTEND_GC_STRESS) args.push("--js-flags=--expose-gc");
  return puppeteer.launch({
    executablePath, args, headless: "shell",
    defaultViewport: { width: Number(opts.width), height: Number(opts.height) },
  });
}

/** Page side: ``hold(promise, ms, fallback)`` settles as ``promise`` does, or after ``ms`` with ``fallback`` (an error
 * when none is given). Its timer keeps the awaited chain reachable: Chromium collects a pending promise nothing else
 * references (an image's onload on a replaced element, a frame callback) and puppeteer then fails the whole run with
 * "Promise was collected" (seen once on a loaded CI machine). */
function installHold() {
  window.__analogyHold = (promise, ms = 60000, ...fallback) => new Promise((resolve, reject) => {
    const timer = setTimeout(() => (fallback.length ? resolve(fallback[0])
      : reject(new Error(`the page did not answer in ${ms} ms`))), ms);
    Promise.resolve(promise).then((v) => { clearTimeout(timer); resolve(v); },
                                  (e) => { clearTimeout(timer); reject(e); });
  });
  window.__analogyFrames = () => window.__analogyHold(
    new Promise((resolve) => requestAnimationFrame(() => requestAnimationFrame(resolve))), 2000, null);
}

/** One step of the run, named in its error. A step Chromium cut short with "Promise was collected" (a protocol
 * race under memory pressure, not an answer of the frontend) runs again, twice at most; every step is idempotent. */
async function step(name, run) {
  for (let attempt = 1; ; attempt++) {
    try {
      return await run();
    } catch (e) {
      if (attempt < 3 && String(e).includes("Promise was collected")) {
        console.error(`${name}: ${e.message}; running the step again`);
        continue;
      }
      e.message = `${name}: ${e.message}`;
      throw e;
    }
  }
}

async function openFrontend(page, url) {
  await page.evaluateOnNewDocument(installHold);
  const put = await fetch(`${url}/api/settings`, { method: "POST", body: JSON.stringify(QUIET_SETTINGS) });
  if (!put.ok) throw new Error(`POST /api/settings answered ${put.status}`);
  await page.goto(url, { waitUntil: "networkidle0", timeout: 120000 });
  await page.waitForFunction(
    () => window.app?.graph && window.app.canvas && window.LiteGraph
      && Object.keys(window.LiteGraph.registered_node_types).length > 0 && window.app.extensionManager?.command,
    { polling: 100, timeout: 120000 });
  await page.evaluate(() => {
    // The frontend's own list of missing node types, as it hands it to extensions after loading a graph.
    window.__analogyMissing = null;
    window.app.registerExtension({
      name: "analogy.frontend-check",
      afterConfigureGraph(missing) {
        window.__analogyMissing = (missing ?? []).map((m) => (typeof m === "string" ? m : m.type));
      },
    });
  });
}

/** Close the open dialogs and wait until they are gone from the page. */
async function closeDialogs(page) {
  for (let i = 0; i < 3 && (await page.$(".p-dialog")); i++) await page.keyboard.press("Escape");
  await page.waitForFunction(() => !document.querySelector(".p-dialog"), { polling: 100, timeout: 10000 });
}

/** Load through the frontend's own path (what dropping a file or picking a template does). */
async function load(page, workflow, name) {
  await closeDialogs(page);  // the last workflow's (a dialog still closing would swallow the next one's)
  await page.evaluate(async (workflow, name) => {
    window.__analogyMissing = null;
    await window.__analogyHold(window.app.loadGraphData(workflow, true, true, name));
  }, workflow, name);
  // Image previews (LoadImage) arrive over HTTP and may resize their nodes; describe the settled graph.
  await page.waitForNetworkIdle({ idleTime: 200, timeout: 30000 }).catch(() => {});
  await page.evaluate(() => window.__analogyFrames());
}

/** Everything the checks need, read from the frontend's own objects. Ids and link lists are normalised: newer
 * frontends (1.5x) hold numeric node ids as strings in links and slot link lists as reactive proxies. */
async function describe(page) {
  return page.evaluate(async () => {
    const asId = (v) => (typeof v === "string" && /^\d+$/.test(v) ? Number(v) : v);
    const graph = window.app.graph;
    const registered = window.LiteGraph.registered_node_types;
    const widgetOptions = (w) => {
      const o = w.options ?? {};
      const pick = {};
      for (const key of ["min", "max", "step", "step2", "round", "precision", "serialize"]) {
        if (o[key] !== undefined) pick[key] = o[key];
      }
      if (Array.isArray(o.values)) pick.values = o.values;
      return pick;
    };
    const nodes = graph.nodes.map((node) => ({
      id: asId(node.id),
      type: node.type,
      comfy_class: node.comfyClass ?? null,
      title: node.title,
      registered: node.type in registered,
      has_errors: Boolean(node.has_errors),
      mode: node.mode,
      collapsed: Boolean(node.flags?.collapsed),
      bounding: Array.from(node.getBounding()),
      inputs: (node.inputs ?? []).map((s) => ({
        name: s.name, type: s.type, link: s.link ?? null, widget: s.widget?.name ?? null,
      })),
      outputs: (node.outputs ?? []).map((s) => ({ name: s.name, type: s.type, links: Array.from(s.links ?? []) })),
      widgets: (node.widgets ?? []).map((w) => ({
        name: w.name, type: w.type, value: w.value, options: widgetOptions(w),
      })),
    }));
    const linkList = graph.links instanceof Map ? [...graph.links.values()] : Object.values(graph.links ?? {});
    const links = linkList.filter(Boolean).map((l) => ({
      id: l.id, origin_id: asId(l.origin_id), origin_slot: l.origin_slot, target_id: asId(l.target_id),
      target_slot: l.target_slot, type: l.type,
    }));
    const { output, workflow: promptWorkflow } = await window.__analogyHold(window.app.graphToPrompt());
    const dialogs = [...document.querySelectorAll(".p-dialog")].map((d) => d.innerText.slice(0, 4000));
    return {
      missing_node_types: window.__analogyMissing,
      nodes, links, prompt: output, prompt_workflow: promptWorkflow,
      serialized: graph.serialize(), dialogs,
    };
  });
}

// Overlays of focus mode that would sit on the picture: the zoom buttons and the menu button.
const SCREENSHOT_CSS = ".p-buttongroup, .comfy-menu-hamburger, .p-toast { display: none !important; }";

async function screenshot(page, file) {
  await closeDialogs(page);  // the picture shows the graph, not the missing-models dialog of a fresh install
  await page.evaluate(async () => {
    const canvas = window.app.canvas;
    canvas.deselectAll?.();
    canvas.min_font_size_for_lod = 0;  // full detail (titles, widget text) at any zoom
    const boxes = window.app.graph.nodes.map((n) => Array.from(n.getBounding()));
    const left = Math.min(...boxes.map((b) => b[0])), top = Math.min(...boxes.map((b) => b[1]));
    const right = Math.max(...boxes.map((b) => b[0] + b[2])), bottom = Math.max(...boxes.map((b) => b[1] + b[3]));
    canvas.ds.fitToBounds([left, top, right - left, bottom - top], { zoom: 0.96 });
    canvas.setDirty(true, true);
    await window.__analogyFrames();
  });
  await new Promise((resolve) => setTimeout(resolve, 300));  // DOM widgets (text boxes) follow the canvas
  await page.screenshot({ path: file, type: "png" });
}

/** The dialogs open after a load (the missing-models dialog of frontends up to 1.3x among them), as their text. */
async function openDialogs(page) {
  return page.evaluate(() => [...document.querySelectorAll(".p-dialog")].map((d) => d.innerText.slice(0, 4000)));
}

/** Newer frontends (1.5x) list missing models in the Issues tab instead of a dialog: read its store once the
 * frontend has finished checking the model folders. null when the frontend has no such store. */
async function missingModelStore(page) {
  const ready = () => {
    const pinia = document.querySelector("#vue-app").__vue_app__.config.globalProperties.$pinia;
    const store = pinia._s.get("missingModel");
    return !store || !store.isRefreshingMissingModels;
  };
  await page.waitForFunction(ready, { polling: 100, timeout: 20000 }).catch(() => {});
  await page.waitForNetworkIdle({ idleTime: 300, timeout: 10000 }).catch(() => {});
  return page.evaluate(() => {
    const pinia = document.querySelector("#vue-app").__vue_app__.config.globalProperties.$pinia;
    const store = pinia._s.get("missingModel");
    if (!store) return null;
    return (store.missingModelCandidates ?? []).map((c) => ({
      name: c.name, directory: c.directory ?? null, url: c.url ?? null, is_missing: c.isMissing ?? null,
      node_id: c.nodeId == null ? null : String(c.nodeId),
    }));
  });
}

/** The frontend's Pinia stores (the node definitions, the help panel, the side bar). */
function stores() {
  const pinia = document.querySelector("#vue-app").__vue_app__.config.globalProperties.$pinia;
  return { nodeDef: pinia._s.get("nodeDef"), help: pinia._s.get("nodeHelp"), sidebar: pinia._s.get("sidebarTab") };
}

/** Open a node type's help page the way the node library's help button does, and report what it rendered. */
async function openHelp(page, nodeType) {
  await page.evaluate((storesSource) => {  // the node library creates the help store (newer frontends: lazily)
    const { sidebar } = new Function(`return (${storesSource})()`)();
    if (sidebar.activeSidebarTabId !== "node-library") sidebar.toggleSidebarTab("node-library");
  }, stores.toString());
  await page.waitForFunction(new Function(`return Boolean((${stores.toString()})().help)`),
                             { polling: 100, timeout: 20000 });
  await page.evaluate((nodeType, storesSource) => {
    const { nodeDef, help } = new Function(`return (${storesSource})()`)();
    const def = nodeDef.nodeDefsByName[nodeType];
    if (!def) throw new Error(`no node definition ${nodeType}`);
    help.closeHelp();
    help.openHelp(def);
  }, nodeType, stores.toString());
  await page.waitForFunction(() => {
    const box = document.querySelector(".node-help-content");
    return box && !box.querySelector(".p-progressspinner") && box.innerText.trim().length > 0;
  }, { polling: 100, timeout: 20000 });
  await page.waitForNetworkIdle({ idleTime: 200, timeout: 10000 }).catch(() => {});
  return page.evaluate(async () => {
    const box = document.querySelector(".node-help-content");
    const images = [...box.querySelectorAll("img")];
    const settled = (img) => (img.complete ? null : new Promise((r) => { img.onload = img.onerror = r; }));
    await window.__analogyHold(Promise.all(images.map(settled)), 20000, null);  // unloaded pictures are reported
    return {
      fallback: Boolean(box.querySelector(".fallback-content")),
      headings: [...box.querySelectorAll("h1, h2, h3")].map((h) => `${h.tagName.toLowerCase()} ${h.innerText.trim()}`),
      images: images.map((img) => ({ src: img.getAttribute("src"), loaded: img.complete && img.naturalWidth > 0,
                                     width: img.naturalWidth })),
      text: box.innerText.slice(0, 2000),
    };
  });
}

// A wait puppeteer abandons (a timed-out waitForFunction) can still reject later, outside any await, with
// "Promise was collected" when Chromium collects its page-side poller; that is no answer of the frontend, so it is
// logged instead of ending the run (seen on a fresh CI clone). Any other stray rejection still fails the run.
process.on("unhandledRejection", (reason) => {
  if (String(reason).includes("Promise was collected")) {
    console.error(`ignored a stray rejection of an abandoned wait: ${String(reason).slice(0, 200)}`);
    return;
  }
  console.error(reason);
  process.exit(1);
});

const started = Date.now();
const browser = await launchBrowser();
const report = { frontend_version: null, workflows: {}, seconds: {} };
try {
  const page = await browser.newPage();
  const consoleErrors = [];
  page.on("console", (m) => m.type() === "error" && consoleErrors.push(m.text().slice(0, 300)));
  page.on("pageerror", (e) => consoleErrors.push(`pageerror: ${String(e).slice(0, 300)}`));
  if (process.env.ANALOGY_FRONTEND_GC_STRESS) {
    await page.evaluateOnNewDocument(() => setInterval(() => window.gc?.(), Number(window.__gcEvery ?? 250)));
  }
  await step("open the frontend", () => openFrontend(page, opts.url));
  report.frontend_version = await step("read the frontend version",
    () => page.evaluate(() => window.__COMFYUI_FRONTEND_VERSION__ ?? null));
  report.seconds.open_frontend = (Date.now() - started) / 1000;
  if (opts.screenshots) {
    fs.mkdirSync(opts.screenshots, { recursive: true });
    await page.evaluate(() => window.app.extensionManager.command.execute("Workspace.ToggleFocusMode"));
    await page.addStyleTag({ content: SCREENSHOT_CSS });
  }
  for (const file of workflows) {
    const t0 = Date.now();
    const name = path.basename(file, ".json");
    consoleErrors.length = 0;
    const workflow = JSON.parse(fs.readFileSync(file, "utf8"));
    const facts = await step(`open ${name}`, async () => {
      await load(page, workflow, name);
      return describe(page);
    });
    facts.missing_model_store = await step(`missing models of ${name}`, () => missingModelStore(page));
    if (opts.screenshots) {
      const file = path.join(opts.screenshots, `${name}.png`);
      await step(`screenshot of ${name}`, () => screenshot(page, file));
    }
    facts.console_errors = [...consoleErrors];
    report.workflows[name] = facts;
    report.seconds[name] = (Date.now() - t0) / 1000;
  }
  if (opts["place-files"]) {
    const t0 = Date.now();
    for (const file of JSON.parse(fs.readFileSync(opts["place-files"], "utf8"))) {
      fs.mkdirSync(path.dirname(file), { recursive: true });
      fs.writeFileSync(file, "");
    }
    // What the user does after downloading: refresh (the R key), so the loaders list the new files.
    await step("refresh the loaders' lists", () => page.evaluate(() => window.app.refreshComboInNodes()));
    report.reloaded = {};
    for (const file of workflows) {
      const name = path.basename(file, ".json");
      const workflow = JSON.parse(fs.readFileSync(file, "utf8"));
      report.reloaded[name] = await step(`reopen ${name}`, async () => {
        await load(page, workflow, name);
        return { dialogs: await openDialogs(page), missing_model_store: await missingModelStore(page) };
      });
    }
    report.seconds.reloaded = (Date.now() - t0) / 1000;
  }
  if (opts["help-nodes"]) {
    const t0 = Date.now();
    await step("close the dialogs", () => closeDialogs(page));
    report.help = {};
    for (const nodeType of opts["help-nodes"].split(",").filter(Boolean)) {
      consoleErrors.length = 0;
      report.help[nodeType] = await step(`help of ${nodeType}`, () => openHelp(page, nodeType))
        .catch((e) => ({ error: String(e).slice(0, 500) }));
      report.help[nodeType].console_errors = [...consoleErrors];
    }
    report.seconds.help = (Date.now() - t0) / 1000;
  }
} finally {
  await browser.close();
}
report.seconds.total = (Date.now() - started) / 1000;
fs.writeFileSync(opts.out, JSON.stringify(report, null, 1));
