// The Radar page: signs in with a bearer token, follows the gateway's
// Radar stream (Server-Sent Events) and shows the fleet as a live graph.
// Filters by view, cluster and namespace are applied by the gateway (the
// stream is reopened with them); search highlights and centres on the
// client. Every change the page offers is checked again by the gateway:
// hiding a button is a courtesy, not the protection.

import cytoscape from 'cytoscape';
import './style.css';
import { LARGE_EDGES, STATUS_COLOURS, applyGraph, layoutOptions, portText, stylesheet } from './graph.js';

const TOKEN_KEY = 'cnnf-radar-token';
const $ = (id) => document.getElementById(id);

const state = {
  token: null,
  role: null,
  name: null,
  source: null,
  edges: new Map(),
  openEdge: null,
  clusters: new Set(),
  namespaces: new Set(),
  laidOut: false,
  large: null,
};

/** Counters a test (or a curious operator) can read: pushes received and applied. */
const stats = { pushes: 0, lastChanges: null, lastApplyMs: 0, lastDiffMs: 0, lastLayoutMs: 0 };
window.radarStats = stats;

// ---- token ---------------------------------------------------------------

/** The token from `#token=` (then dropped from the address bar) or this tab's storage. */
function takeToken() {
  const match = window.location.hash.match(/(?:^#|&)token=([^&]+)/);
  if (match) {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(match[1]));
    history.replaceState(null, '', window.location.pathname + window.location.search);
  }
  return sessionStorage.getItem(TOKEN_KEY);
}

function showLogin(message) {
  $('login').hidden = false;
  $('login-error').textContent = message ?? '';
  $('token-input').focus();
}

$('login-form').addEventListener('submit', (event) => {
  event.preventDefault();
  const token = $('token-input').value.trim();
  if (!token) return;
  sessionStorage.setItem(TOKEN_KEY, token);
  $('token-input').value = '';
  start();
});

$('logout').addEventListener('click', () => {
  sessionStorage.removeItem(TOKEN_KEY);
  closeStream();
  state.token = null;
  $('who').textContent = '';
  setStatus('signed out', 'off');
  showLogin();
});

// ---- API -----------------------------------------------------------------

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body?.error?.message) return body.error.message;
  } catch {
    // Not JSON: fall through to the status line.
  }
  return `HTTP ${response.status} ${response.statusText}`;
}

async function api(path, options = {}) {
  const response = await fetch(path, {
    ...options,
    headers: { Authorization: `Bearer ${state.token}`, ...(options.headers ?? {}) },
  });
  if (!response.ok) {
    const error = new Error(await errorMessage(response));
    error.status = response.status;
    throw error;
  }
  return response.status === 204 ? null : response.json();
}

/** Deletes every learned connection an edge stands for (both sides, every port). */
async function deleteLearnedEdge(edge) {
  const refs = edge.learned?.length
    ? edge.learned
    : (edge.ports ?? []).map((port) => ({
        image_id: edge.learned_by.image_id,
        connection: {
          side: edge.learned_by.side,
          peer: edge.learned_by.peer,
          port: port.port,
          protocol: `PROTOCOL_${port.protocol.toUpperCase()}`,
        },
      }));
  for (const ref of refs) {
    await api(`api/v1/models/${encodeURIComponent(ref.image_id)}/learned`, {
      method: 'DELETE',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify(ref.connection),
    });
  }
  return refs.length;
}

// ---- graph ---------------------------------------------------------------

const cy = cytoscape({
  container: $('cy'),
  style: stylesheet(),
  minZoom: 0.02,
  maxZoom: 4,
  selectionType: 'single',
});
window.radar = cy;

function setStatus(text, kind) {
  const status = $('status');
  status.textContent = text;
  status.dataset.state = kind;
}

function tuneForSize() {
  const large = cy.edges().length > LARGE_EDGES;
  if (large === state.large) return;
  state.large = large;
  // Big graphs: cache the picture while panning and zooming, straight edges.
  cy.renderer().hideEdgesOnViewport = large;
  cy.renderer().textureOnViewport = large;
  cy.style().selector('edge').style('curve-style', large ? 'straight' : 'bezier').update();
}

function relayout() {
  cy.layout(layoutOptions(cy.nodes().length)).run();
  cy.fit(undefined, 40);
  // A small graph would be blown up to the maximum zoom.
  if (cy.zoom() > 1.3) {
    cy.zoom(1.3);
    cy.center();
  }
}

function updateFilters(graph) {
  for (const node of graph.nodes ?? []) {
    if (node.cluster) state.clusters.add(node.cluster);
    for (const namespace of node.namespaces ?? []) state.namespaces.add(namespace);
  }
  fillSelect($('cluster'), state.clusters);
  fillSelect($('namespace'), state.namespaces);
}

function fillSelect(select, values) {
  const have = new Set([...select.options].map((o) => o.value));
  for (const value of [...values].sort()) {
    if (!have.has(value)) select.add(new Option(value, value));
  }
}

function onGraph(graph) {
  stats.pushes += 1;
  const started = performance.now();
  const before = cy.nodes().length;
  state.edges = new Map((graph.edges ?? []).map((edge) => [edge.id, edge]));
  const changes = applyGraph(cy, graph);
  stats.lastDiffMs = performance.now() - started;
  tuneForSize();
  // Lay out on the first graph, and again when most of the nodes are new.
  if (!state.laidOut || changes.addedNodes > Math.max(10, before)) {
    const layoutStarted = performance.now();
    relayout();
    stats.lastLayoutMs = performance.now() - layoutStarted;
    state.laidOut = cy.nodes().length > 0;
  }
  applySearch(false);
  updateFilters(graph);
  stats.lastChanges = changes;
  stats.lastApplyMs = performance.now() - started;
  $('counts').textContent = `${cy.nodes().length} nodes · ${cy.edges().length} edges`;
  const warnings = $('warnings');
  warnings.hidden = !(graph.warnings ?? []).length;
  warnings.textContent = (graph.warnings ?? []).join(' · ');
  refreshDialog();
  document.body.dataset.pushes = String(stats.pushes);
}

// ---- the live stream -----------------------------------------------------

function query() {
  const params = new URLSearchParams();
  const view = document.querySelector('input[name="view"]:checked').value;
  if (view !== 'container') params.set('view', view);
  if ($('cluster').value) params.set('cluster', $('cluster').value);
  if ($('namespace').value) params.set('namespace', $('namespace').value);
  return params;
}

function closeStream() {
  if (state.source) state.source.close();
  state.source = null;
}

function openStream() {
  closeStream();
  const params = query();
  // EventSource cannot send headers: the gateway takes the token from the query.
  params.set('access_token', state.token);
  const source = new EventSource(`api/v1/radar/stream?${params}`);
  state.source = source;
  setStatus('connecting', 'connecting');
  source.addEventListener('graph', (event) => {
    if (state.source !== source) return;
    setStatus('live', 'live');
    try {
      onGraph(JSON.parse(event.data));
    } catch (error) {
      setStatus(`bad graph: ${error.message}`, 'error');
    }
  });
  source.addEventListener('error', async () => {
    if (state.source !== source) return;
    setStatus('reconnecting', 'connecting');
    // The browser retries on its own; find out whether the token still works.
    try {
      await api('api/v1/whoami');
    } catch (error) {
      if (error.status === 401) {
        closeStream();
        setStatus('signed out', 'off');
        showLogin(error.message);
      }
    }
  });
}

async function start() {
  state.token = takeToken();
  if (!state.token) {
    showLogin();
    return;
  }
  try {
    const me = await api('api/v1/whoami');
    state.role = me.role;
    state.name = me.name;
  } catch (error) {
    if (error.status === 401) {
      sessionStorage.removeItem(TOKEN_KEY);
      showLogin(error.message);
      return;
    }
    setStatus(`gateway unreachable: ${error.message}`, 'error');
    return;
  }
  $('login').hidden = true;
  $('who').textContent = `${state.name} (${state.role})`;
  document.body.dataset.role = state.role;
  openStream();
}

for (const input of document.querySelectorAll('input[name="view"]')) {
  input.addEventListener('change', () => {
    state.laidOut = false;
    openStream();
  });
}
$('cluster').addEventListener('change', openStream);
$('namespace').addEventListener('change', openStream);
$('relayout').addEventListener('click', relayout);

// ---- search --------------------------------------------------------------

let searchTimer = null;
$('search').addEventListener('input', () => {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(() => applySearch(true), 150);
});

/** Highlights nodes whose name or id contains the search text; centres on them when asked. */
function applySearch(centre) {
  const text = $('search').value.trim().toLowerCase();
  cy.batch(() => {
    cy.elements().removeClass('faded match');
    if (!text) return;
    const hits = cy.nodes().filter((node) => {
      const name = String(node.data('name')).toLowerCase();
      return name.includes(text) || node.id().toLowerCase().includes(text);
    });
    cy.elements().addClass('faded');
    hits.closedNeighborhood().removeClass('faded');
    hits.addClass('match');
    state.hits = hits;
  });
  if (!text) {
    $('search-result').textContent = '';
    return;
  }
  const hits = cy.nodes('.match');
  $('search-result').textContent = hits.length ? `${hits.length} found` : 'no match';
  if (centre && hits.length) {
    cy.animate({ fit: { eles: hits.closedNeighborhood(), padding: 80 }, duration: 250 });
  }
}

// ---- the edge dialog -----------------------------------------------------

const dialog = $('edge-dialog');

function formatTime(ms) {
  return ms ? new Date(ms).toLocaleString() : 'unknown';
}

function nodeName(id) {
  const node = cy.getElementById(id);
  return node.nonempty() ? node.data('name') : id;
}

function deciderText(decidedBy) {
  if (!decidedBy) return 'unknown';
  const [kind, ...rest] = decidedBy.split(':');
  const what = rest.join(':');
  if (kind === 'model') return `model of ${nodeName(`image:${what}`)} (${what})`;
  if (kind === 'rule') return `rule ${what}`;
  return decidedBy;
}

function fillDialog(edge) {
  $('edge-title').textContent = `${nodeName(edge.source)} → ${nodeName(edge.target)}`;
  $('edge-kind').textContent = { learned: 'learned (solid)', rule: 'rule (dotted)', audit: 'seen in audits only (dashed)' }[
    edge.kind
  ] ?? edge.kind;
  const ports = $('edge-ports');
  ports.replaceChildren(
    ...(edge.ports ?? []).map((port) => {
      const chip = document.createElement('span');
      chip.className = `port ${port.status}`;
      chip.dataset.status = port.status;
      chip.style.color = STATUS_COLOURS[port.status] ?? '';
      chip.textContent = `${portText(port)} ${port.status}`;
      return chip;
    }),
  );
  $('edge-count').textContent = String(edge.count ?? 0);
  $('edge-first').textContent = formatTime(edge.first_seen);
  $('edge-last').textContent = formatTime(edge.last_seen);
  $('edge-decided').textContent = deciderText(edge.decided_by);
  const recent = $('edge-recent');
  recent.replaceChildren(
    ...(edge.recent ?? []).map((r) => {
      const row = document.createElement('tr');
      for (const text of [formatTime(r.time), r.verdict, String(r.count)]) {
        const cell = document.createElement('td');
        cell.textContent = text;
        row.append(cell);
      }
      return row;
    }),
  );
  if (!(edge.recent ?? []).length) {
    const row = document.createElement('tr');
    const cell = document.createElement('td');
    cell.colSpan = 3;
    cell.className = 'muted';
    cell.textContent = 'no alerts or prevents in the window';
    row.append(cell);
    recent.append(row);
  }
  const button = $('delete-edge');
  const learned = edge.kind === 'learned' && (edge.learned?.length || edge.learned_by);
  button.hidden = !learned;
  const mayDelete = state.role === 'operator' || state.role === 'admin';
  button.disabled = !mayDelete;
  button.title = mayDelete ? '' : `Deleting needs role operator; you have role ${state.role}`;
  const note = $('edge-note');
  if (edge.kind === 'rule') note.textContent = 'Rule edges change through their rule, not here.';
  else if (learned && !mayDelete) note.textContent = `Read only: deleting needs role operator; you have role ${state.role}.`;
  else note.textContent = '';
}

function openDialog(id) {
  const edge = state.edges.get(id);
  if (!edge) return;
  state.openEdge = id;
  $('edge-error').textContent = '';
  dialog.dataset.edgeId = id;
  dialog.dataset.gone = 'false';
  fillDialog(edge);
  if (!dialog.open) dialog.showModal();
}

/** Keeps an open dialog true to the latest push. */
function refreshDialog() {
  if (!dialog.open || !state.openEdge) return;
  const edge = state.edges.get(state.openEdge);
  if (edge) {
    fillDialog(edge);
    return;
  }
  dialog.dataset.gone = 'true';
  $('delete-edge').hidden = true;
  $('edge-note').textContent = 'This edge is no longer in the graph.';
}

dialog.addEventListener('close', () => {
  state.openEdge = null;
  cy.edges(':selected').unselect();
});

cy.on('tap', 'edge', (event) => openDialog(event.target.id()));

$('delete-edge').addEventListener('click', async () => {
  const edge = state.edges.get(state.openEdge);
  if (!edge) return;
  const button = $('delete-edge');
  button.disabled = true;
  $('edge-error').textContent = '';
  $('edge-note').textContent = 'Deleting…';
  try {
    const deleted = await deleteLearnedEdge(edge);
    if (dialog.dataset.gone !== 'true') {
      $('edge-note').textContent = `Deleted ${deleted} learned connection(s); the graph updates when the model has applied it.`;
    }
  } catch (error) {
    $('edge-note').textContent = '';
    $('edge-error').textContent = `Not deleted: ${error.message}`;
    button.disabled = !(state.role === 'operator' || state.role === 'admin');
  }
});

start();
