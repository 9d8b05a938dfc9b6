// The page of `headstart serve`: pick or drop photos, one POST /predict per photo, each card fills in as its
// answer comes. Everything is built with textContent: file names and labels are never parsed as HTML.
"use strict";
(function () {
  const drop = document.getElementById("drop");
  const picker = document.getElementById("picker");
  const results = document.getElementById("results");
  const status = document.getElementById("status");
  const PARALLEL = 3;
  let limits = { max_upload_bytes: 20 * 1024 * 1024 };
  let pending = 0;

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  fetch("/model").then((r) => r.json()).then((m) => {
    limits = m.limits || limits;
    const acc = m.metrics && m.metrics.val_accuracy !== undefined
      ? `, validation accuracy ${(100 * m.metrics.val_accuracy).toFixed(1)}%`
      : m.metrics && m.metrics.val_map !== undefined ? `, validation mAP ${m.metrics.val_map.toFixed(3)}` : "";
    document.getElementById("model-info").textContent =
      `${m.backbone} (${m.quantization}), ${m.classes.length} ${m.multi_label ? "labels (several per photo)" : "classes"}${acc}`;
    const list = document.getElementById("classes");
    m.classes.forEach((c) => list.appendChild(el("li", "", c)));
  }).catch(() => { document.getElementById("model-info").textContent = "could not read /model"; });

  function card(file) {
    const node = el("article", "result pending");
    node.dataset.file = file.name;
    const img = el("img");
    img.alt = file.name;
    img.src = URL.createObjectURL(file);
    const body = el("div", "body");
    body.append(el("p", "name", file.name), el("p", "label", "…"));
    node.append(img, body);
    results.prepend(node);
    return node;
  }

  function show(node, result) {
    node.classList.remove("pending");
    node.classList.add("done");
    // A multi-label model: the labels that are on, and a bar for every label (those on in the accent colour).
    const multi = Array.isArray(result.scores);
    node.querySelector(".label").textContent = multi ? (result.labels.join(", ") || "no label") : result.label;
    const body = node.querySelector(".body");
    (multi ? result.scores : result.top_k).forEach((t, i) => {
      const row = el("div", multi && t.on ? "bar on" : "bar");
      const track = el("div", "track");
      const fill = el("div", (multi ? t.on : i === 0) ? "fill top" : "fill");
      fill.style.width = `${(100 * t.probability).toFixed(1)}%`;
      track.appendChild(fill);
      row.append(el("span", "cls", t.label), el("span", "pct", `${(100 * t.probability).toFixed(1)}%`), track);
      body.appendChild(row);
    });
  }

  function fail(node, message) {
    node.classList.remove("pending");
    node.classList.add("error", "done");
    node.querySelector(".label").textContent = message;
  }

  async function predict(file, node) {
    if (file.size > limits.max_upload_bytes) return fail(node, "too large to upload");
    const form = new FormData();
    form.append("file", file, file.name);
    try {
      const r = await fetch("/predict?top_k=3", { method: "POST", body: form });
      const answer = await r.json();
      if (!r.ok) return fail(node, answer.files ? answer.files[0].error : answer.detail);
      show(node, answer.results[0]);
    } catch (e) {
      fail(node, "the server did not answer");
    }
  }

  async function run(files) {
    const queue = files.map((f) => [f, card(f)]);
    pending += queue.length;
    status.textContent = `classifying ${pending} photo(s)…`;
    const worker = async () => {
      while (queue.length) {
        const [file, node] = queue.shift();
        await predict(file, node);
        pending -= 1;
        status.textContent = pending ? `classifying ${pending} photo(s)…` : "";
      }
    };
    await Promise.all(Array.from({ length: Math.min(PARALLEL, queue.length) }, worker));
  }

  picker.addEventListener("change", () => { run(Array.from(picker.files)); picker.value = ""; });
  ["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.add("over"); }));
  ["dragleave", "drop"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.remove("over"); }));
  drop.addEventListener("drop", (e) => run(Array.from(e.dataTransfer.files)));
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); picker.click(); } });
  // Dropping a photo next to the zone would make the browser open it in place of the page.
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());
})();
