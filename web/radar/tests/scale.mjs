// Measures the Radar page with a large synthetic graph (default 1,000 nodes,
// 10,000 edges) in Debian's headless Chromium: time to the first drawn
// graph, time to apply an incremental push, and frames drawn while panning.
// A measurement, not a test: it prints numbers and asserts nothing about
// speed. It serves dist/ itself and answers the page's three API calls
// with the synthetic graph, so no gateway is needed.
//
//   npm run build && node tests/scale.mjs [nodes] [edges]

import { createServer } from 'node:http';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { extname, join, normalize } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const NODES = Number(process.argv[2] ?? 1000);
const EDGES = Number(process.argv[3] ?? 10000);
const dist = fileURLToPath(new URL('../dist/', import.meta.url));
const STATUSES = ['allowed', 'alerted', 'blocked', 'observed'];

// mulberry32: a small seeded generator, so every run draws the same graph.
let seed = 42;
const random = () => {
  seed = (seed + 0x6d2b79f5) | 0;
  let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
  t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
  return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
};

function makeGraph() {
  const nodes = [];
  for (let i = 0; i < NODES; i += 1) {
    const kind = i % 20 === 0 ? 'object' : 'image';
    nodes.push({
      id: `${kind}:n${i}`,
      kind,
      name: `${kind === 'image' ? 'svc' : 'net'}-${i}`,
      containers: kind === 'image' ? 1 + (i % 7) : 0,
      state: i % 3 === 0 ? 'learning' : kind === 'image' ? 'enforcing' : 'none',
      cluster: `c${i % 3}`,
      namespaces: [],
    });
  }
  const edges = new Map();
  while (edges.size < EDGES) {
    const a = nodes[Math.floor(random() * NODES)].id;
    const b = nodes[Math.floor(random() * NODES)].id;
    if (a === b) continue;
    const kind = random() < 0.8 ? 'learned' : random() < 0.5 ? 'rule' : 'audit';
    const id = `${kind}:${a}->${b}`;
    edges.set(id, {
      id,
      source: a,
      target: b,
      kind,
      ports: [{ port: 1000 + Math.floor(random() * 9000), protocol: 'tcp', status: STATUSES[Math.floor(random() * 4)] }],
      count: 1,
      first_seen: 1767225600000,
      last_seen: 1767229200000,
      decided_by: 'model:x',
      recent: [],
    });
  }
  return { nodes, edges: [...edges.values()], warnings: [] };
}

let graph = makeGraph();
const streams = new Set();
const types = { '.html': 'text/html', '.js': 'text/javascript', '.css': 'text/css' };
const server = createServer((request, response) => {
  const url = new URL(request.url, 'http://x');
  if (url.pathname === '/api/v1/whoami') {
    response.writeHead(200, { 'content-type': 'application/json' });
    response.end(JSON.stringify({ name: 'scale', role: 'viewer' }));
  } else if (url.pathname === '/api/v1/radar/stream') {
    response.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' });
    response.write(`event: graph\ndata: ${JSON.stringify(graph)}\n\n`);
    streams.add(response);
    request.on('close', () => streams.delete(response));
  } else {
    const file = normalize(url.pathname === '/' ? 'index.html' : url.pathname.slice(1));
    try {
      const body = readFileSync(join(dist, file));
      response.writeHead(200, { 'content-type': types[extname(file)] ?? 'application/octet-stream' });
      response.end(body);
    } catch {
      response.writeHead(404);
      response.end();
    }
  }
});
await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
const url = `http://127.0.0.1:${server.address().port}`;

const profile = mkdtempSync(join(tmpdir(), 'cnnf-radar-scale-'));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: '/usr/bin/chromium',
  headless: true,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking'],
  viewport: { width: 1400, height: 900 },
});
try {
  const page = await context.newPage();
  const started = Date.now();
  await page.goto(`${url}/#token=scale`);
  await page.waitForFunction(() => window.radarStats?.pushes >= 1, null, { timeout: 300_000 });
  // Let the first frame draw.
  await page.evaluate(() => new Promise((resolve) => requestAnimationFrame(() => requestAnimationFrame(resolve))));
  const first = Date.now() - started;
  const firstApply = await page.evaluate(() => window.radarStats.lastApplyMs);
  const drawn = await page.evaluate(() => [window.radar.nodes().length, window.radar.edges().length]);

  // An incremental push: 50 edges change status, 20 go, 20 come.
  const edges = graph.edges.slice(20);
  for (const edge of edges.slice(0, 50)) edge.ports = [{ ...edge.ports[0], status: 'blocked' }];
  for (let i = 0; i < Math.min(20, Math.floor(NODES / 2)); i += 1) {
    const [a, b] = [graph.nodes[i].id, graph.nodes[NODES - 1 - i].id];
    edges.push({ ...graph.edges[0], id: `audit:${a}->${b}:new`, source: a, target: b, kind: 'audit' });
  }
  graph = { ...graph, edges };
  for (const stream of streams) stream.write(`event: graph\ndata: ${JSON.stringify(graph)}\n\n`);
  await page.waitForFunction(() => window.radarStats.pushes >= 2, null, { timeout: 60_000 });
  const update = await page.evaluate(() => ({ ms: window.radarStats.lastApplyMs, changes: window.radarStats.lastChanges }));

  // Frames drawn while a person drags the graph and turns the wheel.
  await page.evaluate(() => {
    window.frameCount = 0;
    const tick = () => {
      window.frameCount += 1;
      window.frameLoop = requestAnimationFrame(tick);
    };
    window.frameLoop = requestAnimationFrame(tick);
  });
  const gestureStarted = Date.now();
  await page.mouse.move(300, 300);
  await page.mouse.down();
  for (let i = 0; i < 40; i += 1) await page.mouse.move(300 + i * 10, 300 + i * 5);
  await page.mouse.up();
  for (let i = 0; i < 20; i += 1) await page.mouse.wheel(0, i % 2 ? 120 : -120);
  const gestureMs = Date.now() - gestureStarted;
  const frames = (await page.evaluate(() => {
    cancelAnimationFrame(window.frameLoop);
    return window.frameCount;
  })) / (gestureMs / 1000);
  await page.evaluate(() => window.radar.fit(undefined, 30));
  await page.waitForTimeout(500);
  await page.screenshot({ path: join(tmpdir(), 'radar-scale.png') });
  console.log(`graph: ${drawn[0]} nodes, ${drawn[1]} edges`);
  console.log(`first graph drawn: ${first} ms after navigation (apply + layout: ${firstApply.toFixed(0)} ms)`);
  console.log(`incremental push applied in ${update.ms.toFixed(1)} ms: ${JSON.stringify(update.changes)}`);
  console.log(`panning and zooming: ${frames.toFixed(1)} frames/s`);
  console.log(`screenshot: ${join(tmpdir(), 'radar-scale.png')}`);
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
  for (const stream of streams) stream.end();
  server.close();
}
