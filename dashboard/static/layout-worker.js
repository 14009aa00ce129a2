// pgdag dashboard: graph layout off the main thread, with the vendored dagre
// (see vendor/README.md). Nodes and edges come as indices, so step names never become
// dagre's object keys. Answers {id, width, height, xy, edgeOffsets, edgePoints, ms}.
"use strict";
// The worker's own URL carries ?token=... when the page has one; the library needs it too.
importScripts(new URL("vendor/dagre-3.1.3.min.js" + self.location.search, self.location.href).toString());

self.onmessage = function (ev) {
  const { id, sizes, edges, graph, layoutOptions } = ev.data;
  const started = performance.now();
  try {
    const g = new dagre.graphlib.Graph();
    g.setGraph(graph);
    g.setDefaultEdgeLabel(function () {
      return {};
    });
    const n = sizes.length / 2;
    for (let i = 0; i < n; i++) g.setNode(String(i), { width: sizes[2 * i], height: sizes[2 * i + 1] });
    for (let j = 0; j < edges.length; j += 2) g.setEdge(String(edges[j]), String(edges[j + 1]));
    dagre.layout(g, layoutOptions);
    const xy = new Float64Array(2 * n);
    for (let i = 0; i < n; i++) {
      const node = g.node(String(i));
      xy[2 * i] = node.x;
      xy[2 * i + 1] = node.y;
    }
    const m = edges.length / 2;
    const edgeOffsets = new Int32Array(m + 1);
    const chunks = [];
    let total = 0;
    for (let j = 0; j < m; j++) {
      const e = g.edge(String(edges[2 * j]), String(edges[2 * j + 1]));
      const pts = (e && e.points) || [];
      chunks.push(pts);
      total += pts.length;
      edgeOffsets[j + 1] = total;
    }
    const edgePoints = new Float64Array(2 * total);
    let k = 0;
    for (const pts of chunks) {
      for (const p of pts) {
        edgePoints[k++] = p.x;
        edgePoints[k++] = p.y;
      }
    }
    const label = g.graph();
    self.postMessage(
      {
        id,
        width: label.width || 0,
        height: label.height || 0,
        xy,
        edgeOffsets,
        edgePoints,
        ms: performance.now() - started,
      },
      [xy.buffer, edgeOffsets.buffer, edgePoints.buffer],
    );
  } catch (err) {
    self.postMessage({ id, error: String((err && err.message) || err) });
  }
};
