// End-to-end test of the Radar page in Debian's headless Chromium, driven by
// Playwright (playwright-core: the system browser, no browser download).
//
// Expects a gateway with the page and seeded data (services/allinone/tests/
// radar_page.rs sets it up):
//   URL             the gateway, e.g. http://127.0.0.1:9443
//   ADMIN_TOKEN     a token of role admin (or operator)
//   VIEWER_TOKEN    a token of role viewer
//   SCREENSHOT_DIR  where the screenshots go
//   LEARNED_EDGE, ALERTED_EDGE, BLOCKED_EDGE, RULE_EDGE (optional) the edge
//                   ids to check; without them the first edge of each kind or
//                   status is used (and a rule edge may be absent).
//   NAMESPACE, NAMESPACE_NODES (optional) a namespace to filter by and the
//                   node ids (comma-separated) the filtered graph must hold
//                   at the end of the run.
// Exits 0 when every check passed; prints one line per check.

import { mkdtempSync, mkdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const env = (name) => {
  const value = process.env[name];
  if (!value) {
    console.error(`${name} is not set`);
    process.exit(2);
  }
  return value;
};
const URL = env('URL').replace(/\/$/, '');
const ADMIN = env('ADMIN_TOKEN');
const VIEWER = env('VIEWER_TOKEN');
const SHOTS = env('SCREENSHOT_DIR');
const WAIT = 60_000;

const COLOURS = {
  green: 'rgb(46,204,64)',
  yellow: 'rgb(255,220,0)',
  orange: 'rgb(255,133,27)',
  gray: 'rgb(154,160,166)',
};

let passed = 0;
function check(condition, what, detail) {
  if (!condition) {
    const error = new Error(`FAILED: ${what}${detail === undefined ? '' : `: ${JSON.stringify(detail)}`}`);
    error.checked = true;
    throw error;
  }
  passed += 1;
  console.log(`ok ${passed} - ${what}`);
}

const normalise = (colour) => String(colour).replace(/\s+/g, '');

mkdirSync(SHOTS, { recursive: true });
const profile = mkdtempSync(join(tmpdir(), 'cnnf-radar-chromium-'));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: '/usr/bin/chromium',
  headless: true,
  args: [
    '--headless',
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
  ],
  viewport: { width: 1400, height: 900 },
});

/** Opens the page with `token` in the fragment and waits for a graph with edges. */
async function openRadar(token, label) {
  const page = await context.newPage();
  page.on('console', (message) => {
    if (message.type() === 'error') console.log(`[${label} console] ${message.text()}`);
  });
  page.on('pageerror', (error) => console.log(`[${label} page error] ${error.message}`));
  // Everything the page asks the gateway to change, with the answer.
  page.changes = [];
  page.on('response', (response) => {
    const method = response.request().method();
    if (method !== 'GET' && method !== 'HEAD') page.changes.push({ method, url: response.url(), status: response.status() });
  });
  await page.goto(`${URL}/#token=${encodeURIComponent(token)}`);
  await page.waitForFunction(() => window.radarStats?.pushes >= 1 && window.radar.edges().length >= 3, null, {
    timeout: WAIT,
  });
  // A marker that a reload would wipe out.
  await page.evaluate(() => {
    window.sameDocument = true;
  });
  return page;
}

/** The edges as drawn: id, kind, status, line style and colours from cytoscape's computed style. */
async function drawnEdges(page) {
  return page.evaluate(() =>
    window.radar.edges().map((e) => ({
      id: e.id(),
      kind: e.data('kind'),
      status: e.data('status'),
      label: e.data('label'),
      lineStyle: e.style('line-style'),
      labelColour: e.style('color'),
      lineColour: e.style('line-color'),
    })),
  );
}

/** Clicks the middle of an edge on the canvas, as a person would. */
async function clickEdge(page, id) {
  const point = await page.evaluate((edgeId) => {
    const cy = window.radar;
    const edge = cy.getElementById(edgeId);
    cy.fit(undefined, 60);
    const mid = edge.renderedMidpoint();
    const box = cy.container().getBoundingClientRect();
    return { x: box.left + mid.x, y: box.top + mid.y };
  }, id);
  await page.mouse.click(point.x, point.y);
  await page.waitForFunction((edgeId) => {
    const dialog = document.querySelector('[data-testid="edge-dialog"]');
    return dialog.open && dialog.dataset.edgeId === edgeId;
  }, id, { timeout: 10_000 });
}

async function main() {
  // ---- as admin: the graph and its colours --------------------------------
  const admin = await openRadar(ADMIN, 'admin');
  check((await admin.evaluate(() => window.location.hash)) === '', 'the token is taken out of the address bar');
  check(
    (await admin.evaluate(() => sessionStorage.getItem('cnnf-radar-token'))) === ADMIN,
    'the token is kept in this tab only (sessionStorage)',
  );
  check((await admin.getByTestId('who').textContent()).includes('admin'), 'the page shows who is signed in');

  const edges = await drawnEdges(admin);
  const learned = edges.find((e) => e.id === process.env.LEARNED_EDGE) ?? edges.find((e) => e.kind === 'learned');
  const alerted = edges.find((e) => e.id === process.env.ALERTED_EDGE) ?? edges.find((e) => e.status === 'alerted');
  const blocked = edges.find((e) => e.id === process.env.BLOCKED_EDGE) ?? edges.find((e) => e.status === 'blocked');
  check(learned && learned.kind === 'learned', 'a learned edge is drawn', edges);
  check(learned.lineStyle === 'solid', 'the learned edge is solid', learned);
  check(normalise(learned.labelColour) === COLOURS.green, 'its port label is green (allowed)', learned);
  check(alerted && alerted.status === 'alerted', 'an alerted connection is drawn', edges);
  check(normalise(alerted.labelColour) === COLOURS.yellow, 'the alerted port label is yellow', alerted);
  check(blocked && blocked.status === 'blocked', 'a blocked connection is drawn', edges);
  check(normalise(blocked.labelColour) === COLOURS.orange, 'the blocked port label is orange', blocked);
  const rules = edges.filter((e) => e.kind === 'rule');
  if (process.env.RULE_EDGE) {
    const rule = edges.find((e) => e.id === process.env.RULE_EDGE);
    check(rule && rule.kind === 'rule', 'the operator rule is drawn', edges);
    check(rule.lineStyle === 'dotted', 'the rule edge is dotted', rule);
  }
  check(rules.every((e) => e.lineStyle === 'dotted'), 'every rule edge is dotted', rules);

  const badges = await admin.evaluate(() =>
    window.radar.nodes('[kind = "image"]').map((n) => ({
      name: n.data('name'),
      state: n.data('state'),
      containers: n.data('containers'),
      badge: n.data('badgeColour'),
      image: n.style('background-image'),
    })),
  );
  const enforcing = badges.filter((b) => b.state === 'enforcing');
  const learning = badges.filter((b) => b.state === 'learning');
  check(enforcing.length > 0 && enforcing.every((b) => b.badge === '#000000'), 'enforcing images have black badges', badges);
  check(learning.length > 0 && learning.every((b) => b.badge === '#1f6feb'), 'learning images have blue badges', badges);
  check(badges.every((b) => String(b.image).startsWith('data:image/svg+xml')), 'every image node draws its badge', badges);
  check(badges.some((b) => b.containers === 2), 'a badge counts two running containers', badges);
  await admin.screenshot({ path: join(SHOTS, 'graph.png') });

  // Search: highlight and centre.
  await admin.getByTestId('search').fill('postgres');
  await admin.waitForFunction(() => window.radar.nodes('.match').length === 1);
  check(
    (await admin.getByTestId('search-result').textContent()) === '1 found',
    'search by name highlights the match',
  );
  await admin.screenshot({ path: join(SHOTS, 'search.png') });
  await admin.getByTestId('search').fill('');
  await admin.waitForFunction(() => window.radar.nodes('.match').length === 0);

  // ---- as viewer: read only, and the server refuses --------------------------
  const viewer = await openRadar(VIEWER, 'viewer');
  check((await viewer.getByTestId('who').textContent()).includes('viewer'), 'the viewer page knows its role');
  await clickEdge(viewer, learned.id);
  const button = viewer.getByTestId('delete-edge');
  check(await button.isDisabled(), 'a viewer gets a disabled delete button');
  await viewer.screenshot({ path: join(SHOTS, 'viewer-dialog.png') });
  // A tampered page: enable the button anyway. The gateway must refuse.
  await viewer.evaluate(() => {
    document.querySelector('[data-testid="delete-edge"]').disabled = false;
  });
  await button.click();
  await viewer.waitForFunction(
    () => document.querySelector('[data-testid="edge-error"]').textContent.length > 0,
    null,
    { timeout: WAIT },
  );
  const refusal = await viewer.getByTestId('edge-error').textContent();
  check(/permission denied/.test(refusal) && /needs role operator/.test(refusal), 'the page shows the 403', refusal);
  check(
    viewer.changes.length > 0 && viewer.changes.every((c) => c.status === 403),
    'every change the viewer page sent was refused with 403',
    viewer.changes,
  );
  const served = await viewer.evaluate(async (token) => {
    const response = await fetch('api/v1/radar', { headers: { Authorization: `Bearer ${token}` } });
    return (await response.json()).edges.map((e) => e.id);
  }, VIEWER);
  check(served.includes(learned.id), 'the learned edge is still served after the refusal');
  check(
    await viewer.evaluate((id) => window.radar.getElementById(id).nonempty(), learned.id),
    'the learned edge stays on the viewer page',
  );
  await viewer.screenshot({ path: join(SHOTS, 'viewer-refused.png') });
  await viewer.getByTestId('edge-close').click();

  // ---- as admin: the edge dialog deletes the learned edge, live ----------------
  await clickEdge(admin, learned.id);
  const details = {
    kind: await admin.getByTestId('edge-kind').textContent(),
    ports: await admin.getByTestId('edge-ports').textContent(),
    count: await admin.getByTestId('edge-count').textContent(),
    first: await admin.getByTestId('edge-first-seen').textContent(),
    last: await admin.getByTestId('edge-last-seen').textContent(),
    decided: await admin.getByTestId('edge-decided-by').textContent(),
  };
  check(details.kind.startsWith('learned'), 'the dialog names the kind', details);
  check(details.ports.includes('5432/tcp allowed'), 'the dialog lists the port and its status', details);
  check(Number(details.count) > 0, 'the dialog counts connections', details);
  check(details.first !== 'unknown' && details.last !== 'unknown', 'the dialog has first and last seen', details);
  check(details.decided.startsWith('model of'), 'the dialog names the deciding model', details);
  check(
    (await admin.getByTestId('edge-recent').textContent()).length > 0,
    'the dialog has a recent verdicts table',
  );
  const portColour = await admin.evaluate(
    () => getComputedStyle(document.querySelector('[data-testid="edge-ports"] .port')).color,
  );
  check(normalise(portColour) === COLOURS.green, 'the dialog shows the port in green', portColour);
  check(await admin.getByTestId('delete-edge').isEnabled(), 'an admin may delete the learned edge');
  await admin.screenshot({ path: join(SHOTS, 'edge-dialog.png') });

  const pushesBefore = await admin.evaluate(() => window.radarStats.pushes);
  const viewerPushesBefore = await viewer.evaluate(() => window.radarStats.pushes);
  await admin.getByTestId('delete-edge').click();
  await admin.waitForFunction((id) => window.radar.getElementById(id).empty(), learned.id, { timeout: WAIT });
  check(true, 'the learned edge left the graph');
  check(await admin.evaluate(() => window.sameDocument === true), 'without a reload');
  check(
    (await admin.evaluate(() => window.radarStats.pushes)) > pushesBefore,
    'by a pushed graph (Server-Sent Events)',
  );
  check(
    admin.changes.length >= 1 && admin.changes.every((c) => c.method === 'DELETE' && c.status === 200),
    'the page deleted through DELETE /api/v1/models/<image>/learned',
    admin.changes,
  );
  check(
    (await admin.getByTestId('edge-dialog').getAttribute('data-gone')) === 'true',
    'the open dialog says the edge is gone',
  );
  const remaining = await drawnEdges(admin);
  check(
    remaining.some((e) => e.id === alerted.id) && remaining.some((e) => e.id === blocked.id),
    'the alerted and blocked edges stay',
    remaining,
  );
  await admin.screenshot({ path: join(SHOTS, 'after-delete.png') });
  await viewer.waitForFunction((id) => window.radar.getElementById(id).empty(), learned.id, { timeout: WAIT });
  check(
    (await viewer.evaluate(() => window.radarStats.pushes)) > viewerPushesBefore &&
      (await viewer.evaluate(() => window.sameDocument === true)),
    'the viewer page got the change pushed too',
  );

  // ---- views ---------------------------------------------------------------------
  await viewer.getByTestId('view-host').check();
  await viewer.waitForFunction(() => window.radar.nodes('[kind = "image"]').length === 0, null, { timeout: WAIT });
  check(true, 'the host view leaves out images');
  await viewer.getByTestId('view-container').check();
  await viewer.waitForFunction(() => window.radar.nodes('[kind = "image"]').length > 0, null, { timeout: WAIT });
  check(true, 'the container view shows images again');

  // ---- the namespace filter ---------------------------------------------------------
  const namespace = process.env.NAMESPACE;
  if (namespace) {
    const expected = (process.env.NAMESPACE_NODES ?? '').split(',').filter(Boolean).sort();
    const options = await viewer.evaluate(() => [...document.querySelector('[data-testid="filter-namespace"]').options].map((o) => o.value));
    check(options.includes(namespace), `the namespace filter offers ${namespace}`, options);
    const allNodes = await viewer.evaluate(() => window.radar.nodes().length);
    await viewer.getByTestId('filter-namespace').selectOption(namespace);
    await viewer.waitForFunction(
      (want) => JSON.stringify(window.radar.nodes().map((n) => n.id()).sort()) === JSON.stringify(want),
      expected,
      { timeout: WAIT },
    ).catch(async () => {
      const drawn = await viewer.evaluate(() => window.radar.nodes().map((n) => n.id()).sort());
      check(false, `namespace ${namespace} shows exactly its images and their direct peers`, { expected, drawn });
    });
    check(true, `namespace ${namespace} shows exactly its images and their direct peers`);
    await viewer.screenshot({ path: join(SHOTS, 'namespace.png') });
    await viewer.getByTestId('filter-namespace').selectOption('');
    await viewer.waitForFunction((n) => window.radar.nodes().length === n, allNodes, { timeout: WAIT });
    check(true, 'all namespaces again shows the whole graph');
  }
}

let failed = 0;
try {
  await main();
} catch (error) {
  failed = 1;
  console.error(error.checked ? error.message : error);
  for (const page of context.pages()) {
    await page.screenshot({ path: join(SHOTS, `failure-${context.pages().indexOf(page)}.png`) }).catch(() => {});
  }
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
