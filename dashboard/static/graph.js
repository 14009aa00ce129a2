// pgdag dashboard: a run's DAG as SVG. Layout comes from dagre in a Web Worker
// (layout-worker.js); the graph of a run never changes, so it is laid out once per run and
// live events only change one node's attributes (O(1) per event, no re-layout).
"use strict";
(function () {
  const pgdag = (window.pgdag = window.pgdag || {});
  const SVG_NS = "http://www.w3.org/2000/svg";
  const NODE_W = 156;
  const NODE_H = 40;
  const NAME_CHARS = 19; // what fits in NODE_W at the name's font size
  const SUB_CHARS = 24;
  // Above this many steps (or edges) dagre's best ranker and crossing reduction take many
  // seconds; the faster options of the same library keep a 2,000-step run to about a second.
  const BIG_NODES = 400;
  const BIG_EDGES = 1200;
  const FAR_SCALE = 0.45; // below this zoom, labels are hidden (unreadable, and costly)
  const LAYOUT_CACHE = 8;

  function esc(s) {
    return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
  }

  function shorten(s, n) {
    return s.length <= n ? s : s.slice(0, n - 1) + "…";
  }

  function subLabel(step) {
    if (!step.attempt) return step.tool;
    return `${step.tool} · try ${step.attempt}/${step.maxAttempts}`;
  }

  let layoutWorker = null;
  let layoutSeq = 0;
  const pending = new Map();
  const cache = new Map(); // run id -> layout (a run's graph is immutable)

  function workerUrl() {
    const base = document.querySelector('script[src*="/graph.js"]').src;
    const url = new URL("layout-worker.js", base);
    url.search = new URL(base).search; // ?token=... when the page has one
    return url.toString();
  }

  function layout(runId, steps) {
    if (cache.has(runId)) return Promise.resolve(cache.get(runId));
    if (!layoutWorker) {
      layoutWorker = new Worker(workerUrl());
      layoutWorker.onmessage = (ev) => {
        const p = pending.get(ev.data.id);
        if (!p) return;
        pending.delete(ev.data.id);
        if (ev.data.error) p.reject(new Error(ev.data.error));
        else p.resolve(ev.data);
      };
      layoutWorker.onerror = (ev) => {
        for (const p of pending.values()) p.reject(new Error(ev.message || "layout worker failed"));
        pending.clear();
        layoutWorker = null;
      };
    }
    const index = new Map(steps.map((s, i) => [s.name, i]));
    const sizes = new Float64Array(2 * steps.length);
    const edges = [];
    steps.forEach((s, i) => {
      sizes[2 * i] = NODE_W;
      sizes[2 * i + 1] = NODE_H;
      for (const d of s.dependsOn) {
        const j = index.get(d);
        if (j !== undefined) edges.push(j, i);
      }
      if (s.mapOf) {
        // a map child feeds its map step, which joins the children's outputs
        const j = index.get(s.mapOf);
        if (j !== undefined) edges.push(i, j);
      }
    });
    const big = steps.length > BIG_NODES || edges.length / 2 > BIG_EDGES;
    const id = ++layoutSeq;
    const started = performance.now();
    return new Promise((resolve, reject) => {
      pending.set(id, { resolve, reject });
      layoutWorker.postMessage(
        {
          id,
          sizes,
          edges: Int32Array.from(edges),
          graph: {
            rankdir: "LR",
            nodesep: 10,
            ranksep: 44,
            edgesep: 6,
            marginx: 24,
            marginy: 24,
            ranker: big ? "tight-tree" : "network-simplex",
          },
          layoutOptions: { disableOptimalOrderHeuristic: big },
        },
        [sizes.buffer],
      );
    }).then((result) => {
      result.wallMs = performance.now() - started;
      result.big = big;
      result.edgeCount = edges.length / 2;
      cache.set(runId, result);
      if (cache.size > LAYOUT_CACHE) cache.delete(cache.keys().next().value);
      return result;
    });
  }

  // A smooth path through dagre's edge points (quadratic segments between midpoints).
  function edgePath(pts, from, to) {
    let d = `M${pts[2 * from].toFixed(1)},${pts[2 * from + 1].toFixed(1)}`;
    for (let i = from + 1; i < to - 1; i++) {
      const mx = (pts[2 * i] + pts[2 * i + 2]) / 2;
      const my = (pts[2 * i + 1] + pts[2 * i + 3]) / 2;
      d += `Q${pts[2 * i].toFixed(1)},${pts[2 * i + 1].toFixed(1)} ${mx.toFixed(1)},${my.toFixed(1)}`;
    }
    d += `L${pts[2 * (to - 1)].toFixed(1)},${pts[2 * (to - 1) + 1].toFixed(1)}`;
    return d;
  }

  function arrowHead(pts, to) {
    const x = pts[2 * (to - 1)];
    const y = pts[2 * (to - 1) + 1];
    const px = pts[2 * (to - 2)];
    const py = pts[2 * (to - 2) + 1];
    const len = Math.hypot(x - px, y - py) || 1;
    const ux = (x - px) / len;
    const uy = (y - py) / len;
    const bx = x - 7 * ux;
    const by = y - 7 * uy;
    return `M${x.toFixed(1)},${y.toFixed(1)}L${(bx - 3.5 * uy).toFixed(1)},${(by + 3.5 * ux).toFixed(1)}L${(bx + 3.5 * uy).toFixed(1)},${(by - 3.5 * ux).toFixed(1)}Z`;
  }

  class DagView {
    // `svg` holds the nodes; `edgeSvg`, under it, the edges: two layers, so that recolouring
    // a node repaints only the nodes' layer, never the thousands of edge curves.
    constructor(svg, edgeSvg, { onSelect, onMessage }) {
      this.svg = svg;
      this.edgeSvg = edgeSvg;
      this.edgeViewport = null;
      this.onSelect = onSelect;
      this.onMessage = onMessage;
      this.runId = null;
      this.steps = [];
      this.nodes = new Map(); // step name -> {el, sub, step}
      this.view = { k: 1, x: 0, y: 0 };
      this.size = { width: 0, height: 0 };
      this.viewport = null;
      this.selected = null;
      this.frame = 0;
      this.far = false;
      this.metrics = null;
      this.touched = false; // the user panned or zoomed: keep their view on resize
      this.bindInput();
      this.lastSize = null; // the svg's size the view was last computed for
      new ResizeObserver(() => {
        const r = this.svg.getBoundingClientRect();
        const last = this.lastSize;
        if (last && this.viewport && r.width && r.height) {
          if (this.touched) {
            this.view.x += (r.width - last.width) / 2;
            this.view.y += (r.height - last.height) / 2;
            this.schedule();
          } else {
            this.fitInitial();
          }
        }
        this.lastSize = { width: r.width, height: r.height };
      }).observe(this.svg);
    }

    // Show `run` (with steps); resolves once its graph is on the page.
    // `receivedAt` (performance.now()) is when the snapshot arrived, for the metrics.
    async show(run, receivedAt) {
      const same = this.runId === run.id && this.nodes.size === run.steps.length;
      this.runId = run.id;
      if (same) {
        for (const s of run.steps) this.setStep(s);
        return;
      }
      this.steps = run.steps;
      this.nodes = new Map();
      this.selected = null;
      this.touched = false;
      this.svg.replaceChildren();
      this.edgeSvg.replaceChildren();
      this.onMessage(run.steps.length > BIG_NODES ? `Laying out ${run.steps.length.toLocaleString()} steps…` : "");
      let lay;
      try {
        lay = await layout(run.id, run.steps);
      } catch (err) {
        this.onMessage(`Could not lay out the graph: ${err.message}`);
        return;
      }
      if (this.runId !== run.id) return; // another run was opened meanwhile
      const renderStart = performance.now();
      this.render(run.steps, lay);
      const renderMs = performance.now() - renderStart;
      this.onMessage("");
      this.fitInitial();
      await new Promise((resolve) => requestAnimationFrame(() => setTimeout(resolve, 0)));
      this.metrics = {
        runId: run.id,
        nodes: run.steps.length,
        edges: lay.edgeCount,
        fastLayout: lay.big,
        layoutMs: Math.round(lay.ms),
        layoutWallMs: Math.round(lay.wallMs),
        renderMs: Math.round(renderMs),
        snapshotToPaintMs: receivedAt === undefined ? null : Math.round(performance.now() - receivedAt),
      };
      this.svg.dataset.ready = run.id;
    }

    render(steps, lay) {
      const { xy, edgeOffsets, edgePoints } = lay;
      const edgeParts = [];
      const arrowParts = [];
      for (let j = 0; j + 1 < edgeOffsets.length; j++) {
        const from = edgeOffsets[j];
        const to = edgeOffsets[j + 1];
        if (to - from < 2) continue;
        edgeParts.push(edgePath(edgePoints, from, to));
        arrowParts.push(arrowHead(edgePoints, to));
      }
      // Absolute coordinates, no transform per node: a transform per node gives the
      // compositor one property node per step, which made every frame of a 2,000-step run
      // spend hundreds of milliseconds in layerization.
      const hw = NODE_W / 2;
      const hh = NODE_H / 2;
      const nodeParts = new Array(steps.length);
      for (let i = 0; i < steps.length; i++) {
        const s = steps[i];
        const x = (xy[2 * i] - hw).toFixed(1);
        const y = xy[2 * i + 1] - hh;
        const tx = (xy[2 * i] - hw + 13).toFixed(1);
        nodeParts[i] =
          `<g class="node" data-step="${esc(s.name)}" data-status="${s.status}">` +
          `<title>${esc(s.name)}</title>` +
          `<rect class="box" x="${x}" y="${y.toFixed(1)}" width="${NODE_W}" height="${NODE_H}" rx="6"></rect>` +
          `<rect class="stripe" x="${x}" y="${y.toFixed(1)}" width="5" height="${NODE_H}" rx="2"></rect>` +
          `<text class="name" x="${tx}" y="${(y + hh - 3).toFixed(1)}">${esc(shorten(s.name, NAME_CHARS))}</text>` +
          `<text class="sub" x="${tx}" y="${(y + hh + 12).toFixed(1)}">${esc(shorten(subLabel(s), SUB_CHARS))}</text></g>`;
      }
      this.edgeSvg.innerHTML =
        `<g class="viewport"><path class="edges" d="${edgeParts.join("")}"></path>` +
        `<path class="arrows" d="${arrowParts.join("")}"></path></g>`;
      this.edgeViewport = this.edgeSvg.firstChild;
      this.svg.innerHTML = `<g class="viewport"><g class="nodes">${nodeParts.join("")}</g></g>`;
      this.viewport = this.svg.firstChild;
      const els = this.viewport.firstChild.children;
      for (let i = 0; i < steps.length; i++) {
        this.nodes.set(steps[i].name, { el: els[i], sub: els[i].lastChild, x: xy[2 * i], y: xy[2 * i + 1] });
      }
      this.size = { width: lay.width, height: lay.height };
      this.svg.dataset.nodes = String(steps.length);
    }

    // O(1): one node's status (and its attempt line) from a live event or a fresh snapshot.
    setStep(step) {
      const node = this.nodes.get(step.name);
      if (!node) return;
      if (node.el.getAttribute("data-status") !== step.status) node.el.setAttribute("data-status", step.status);
      const label = shorten(subLabel(step), SUB_CHARS);
      if (node.sub.textContent !== label) node.sub.textContent = label;
    }

    select(name) {
      if (this.selected) {
        const old = this.nodes.get(this.selected);
        if (old) old.el.classList.remove("selected");
      }
      this.selected = name;
      const node = name && this.nodes.get(name);
      if (node) node.el.classList.add("selected");
    }

    // --- pan and zoom --------------------------------------------------------------------
    bindInput() {
      const svg = this.svg;
      let drag = null;
      svg.addEventListener("pointerdown", (ev) => {
        if (ev.button !== 0) return;
        drag = { x: ev.clientX, y: ev.clientY, vx: this.view.x, vy: this.view.y, moved: false, id: ev.pointerId };
      });
      svg.addEventListener("pointermove", (ev) => {
        if (!drag) return;
        const dx = ev.clientX - drag.x;
        const dy = ev.clientY - drag.y;
        if (!drag.moved && Math.hypot(dx, dy) < 4) return;
        if (!drag.moved) {
          drag.moved = true;
          svg.setPointerCapture(drag.id);
          svg.classList.add("dragging");
        }
        this.view.x = drag.vx + dx;
        this.view.y = drag.vy + dy;
        this.touched = true;
        this.schedule();
      });
      const end = (ev) => {
        if (!drag) return;
        const wasDrag = drag.moved;
        drag = null;
        svg.classList.remove("dragging");
        if (wasDrag || ev.type !== "pointerup") return;
        const g = ev.target.closest && ev.target.closest("g.node");
        if (g) this.onSelect(g.getAttribute("data-step"));
      };
      svg.addEventListener("pointerup", end);
      svg.addEventListener("pointercancel", end);
      svg.addEventListener(
        "wheel",
        (ev) => {
          ev.preventDefault();
          this.touched = true;
          if (ev.ctrlKey || ev.metaKey) {
            const r = svg.getBoundingClientRect();
            this.zoomAt(Math.exp(-ev.deltaY * 0.01), ev.clientX - r.left, ev.clientY - r.top);
          } else {
            this.view.x -= ev.deltaX;
            this.view.y -= ev.deltaY;
            this.schedule();
          }
        },
        { passive: false },
      );
    }

    zoomAt(factor, cx, cy) {
      const k = Math.min(3, Math.max(0.01, this.view.k * factor));
      const f = k / this.view.k;
      this.view.x = cx - (cx - this.view.x) * f;
      this.view.y = cy - (cy - this.view.y) * f;
      this.view.k = k;
      this.schedule();
    }

    zoom(factor) {
      this.touched = true;
      const r = this.svg.getBoundingClientRect();
      this.zoomAt(factor, r.width / 2, r.height / 2);
    }

    // The whole graph in view.
    fit() {
      const r = this.svg.getBoundingClientRect();
      this.lastSize = { width: r.width, height: r.height };
      const { width, height } = this.size;
      if (!width || !height || !r.width || !r.height) return;
      const k = Math.min(r.width / width, r.height / height, 1.25);
      this.view = { k, x: (r.width - width * k) / 2, y: Math.max(0, (r.height - height * k) / 2) };
      this.schedule();
    }

    fitsWhole(r) {
      const { width, height } = this.size;
      return width > 0 && height > 0 && Math.min(r.width / width, r.height / height) >= 0.35;
    }

    // Small graphs: all of it. Huge ones: at a zoom where nodes are still blocks of colour,
    // around the run's first step (a root), since the whole of a 2,000-step graph at once
    // is a texture rather than a graph (the Fit button shows it).
    fitInitial() {
      const r = this.svg.getBoundingClientRect();
      this.lastSize = { width: r.width, height: r.height };
      const { width, height } = this.size;
      if (!width || !height || !r.width || !r.height) return;
      if (this.fitsWhole(r)) {
        this.fit();
        return;
      }
      const k = 0.35;
      const first = this.nodes.values().next().value;
      const x = width * k <= r.width ? (r.width - width * k) / 2 : 24 - (first.x - NODE_W / 2) * k;
      const y = height * k <= r.height ? (r.height - height * k) / 2 : r.height / 2 - first.y * k;
      this.view = { k, x, y };
      this.schedule();
    }

    reveal(name) {
      const node = this.nodes.get(name);
      if (!node) return;
      const r = this.svg.getBoundingClientRect();
      this.lastSize = { width: r.width, height: r.height };
      if (!this.touched && this.fitsWhole(r)) {
        this.fitInitial();
        return;
      }
      const sx = node.x * this.view.k + this.view.x;
      const sy = node.y * this.view.k + this.view.y;
      if (sx > 40 && sx < r.width - 40 && sy > 40 && sy < r.height - 40) return;
      this.touched = true;
      this.view.x = r.width / 2 - node.x * this.view.k;
      this.view.y = r.height / 2 - node.y * this.view.k;
      this.schedule();
    }

    schedule() {
      if (this.frame) return;
      this.frame = requestAnimationFrame(() => {
        this.frame = 0;
        if (!this.viewport) return;
        const { k, x, y } = this.view;
        const transform = `translate(${x.toFixed(1)},${y.toFixed(1)}) scale(${k.toFixed(4)})`;
        this.viewport.setAttribute("transform", transform);
        this.edgeViewport.setAttribute("transform", transform);
        const far = k < FAR_SCALE;
        if (far !== this.far) {
          this.far = far;
          this.svg.classList.toggle("far", far);
        }
      });
    }

    clear() {
      this.runId = null;
      this.nodes = new Map();
      this.svg.replaceChildren();
      this.edgeSvg.replaceChildren();
      this.viewport = null;
      this.edgeViewport = null;
      delete this.svg.dataset.ready;
      delete this.svg.dataset.nodes;
    }
  }

  pgdag.DagView = DagView;
  pgdag.esc = esc;
})();
