// The graph side of the Radar page: colours, the cytoscape stylesheet,
// and applying a graph from the gateway to a running cytoscape instance
// by difference (add, update, remove by id), so a push never rebuilds the
// graph and positions survive updates. No DOM access beyond cytoscape.

/** Port label colours by status: allowed, alerted, blocked, observed. */
export const STATUS_COLOURS = {
  allowed: '#2ecc40', // green
  alerted: '#ffdc00', // yellow
  blocked: '#ff851b', // orange
  observed: '#9aa0a6', // gray
};

/** Container-count badge colours by model state. */
export const BADGE_COLOURS = {
  learning: '#1f6feb', // blue
  enforcing: '#000000', // black
};

/** Node fill by kind. */
const KIND_COLOURS = {
  image: '#8fb3d9',
  host_app: '#b39ddb',
  object: '#80cbc4',
  unknown: '#6b7280',
};

const STRENGTH = { observed: 0, allowed: 1, alerted: 2, blocked: 3 };

/** The strongest status among an edge's ports (what colours the edge). */
export function strongestStatus(ports) {
  let best = 'observed';
  for (const port of ports ?? []) {
    if ((STRENGTH[port.status] ?? -1) > STRENGTH[best]) best = port.status;
  }
  return best;
}

/** `5432/tcp`, or `any/tcp` for port 0. */
export function portText(port) {
  return `${port.port === 0 ? 'any' : port.port}/${port.protocol}`;
}

function edgeLabel(ports) {
  const shown = ports.slice(0, 3).map(portText).join(', ');
  return ports.length > 3 ? `${shown} +${ports.length - 3}` : shown;
}

const badgeCache = new Map();

/**
 * The badge of an image node: an SVG pill with the running container count,
 * blue while the model learns (or the image has none yet), black once it enforces.
 */
export function badgeImage(count, state) {
  const colour = state === 'enforcing' ? BADGE_COLOURS.enforcing : BADGE_COLOURS.learning;
  const key = `${count}:${colour}`;
  let uri = badgeCache.get(key);
  if (!uri) {
    const text = count > 999 ? '999+' : String(count);
    const width = 12 + 7 * text.length;
    const svg =
      `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="18" viewBox="0 0 ${width} 18">` +
      `<rect x="1" y="1" width="${width - 2}" height="16" rx="8" fill="${colour}" stroke="#ffffff" stroke-width="1.5"/>` +
      `<text x="${width / 2}" y="13" font-family="sans-serif" font-size="11" font-weight="bold" fill="#ffffff" text-anchor="middle">${text}</text>` +
      `</svg>`;
    uri = `data:image/svg+xml;base64,${btoa(svg)}`;
    badgeCache.set(key, uri);
  }
  return uri;
}

/** Cytoscape data of one node from the gateway's JSON. */
export function nodeData(node) {
  const data = {
    id: node.id,
    kind: node.kind,
    name: node.name || node.id,
    cluster: node.cluster || '',
    state: node.state,
    containers: node.containers,
    fill: KIND_COLOURS[node.kind] ?? KIND_COLOURS.unknown,
  };
  if (node.kind === 'image') {
    data.badge = badgeImage(node.containers, node.state);
    data.badgeColour = node.state === 'enforcing' ? BADGE_COLOURS.enforcing : BADGE_COLOURS.learning;
    data.badgeWidth = 12 + 7 * String(node.containers > 999 ? '999+' : node.containers).length;
  }
  data.sig = JSON.stringify(node);
  return data;
}

/** Cytoscape data of one edge from the gateway's JSON. */
export function edgeData(edge) {
  const status = strongestStatus(edge.ports);
  return {
    id: edge.id,
    source: edge.source,
    target: edge.target,
    kind: edge.kind,
    status,
    colour: STATUS_COLOURS[status],
    label: edgeLabel(edge.ports ?? []),
    sig: JSON.stringify(edge),
  };
}

/** The stylesheet: shapes by kind, badges, solid/dotted/dashed edges, port colours. */
export function stylesheet() {
  return [
    {
      selector: 'node',
      style: {
        'background-color': 'data(fill)',
        label: 'data(name)',
        color: '#e6e6e6',
        'font-size': 11,
        'text-valign': 'bottom',
        'text-margin-y': 4,
        'text-wrap': 'ellipsis',
        'text-max-width': '160px',
        'min-zoomed-font-size': 8,
        width: 30,
        height: 30,
        'border-width': 1,
        'border-color': '#0b0d10',
      },
    },
    {
      selector: 'node[kind = "image"]',
      style: {
        shape: 'ellipse',
        'background-image': 'data(badge)',
        'background-width': 'data(badgeWidth)',
        'background-height': 18,
        'background-fit': 'none',
        'background-clip': 'none',
        'background-image-containment': 'over',
        'background-offset-x': 16,
        'background-offset-y': -14,
        'bounds-expansion': 24,
      },
    },
    { selector: 'node[kind = "host_app"]', style: { shape: 'round-rectangle' } },
    { selector: 'node[kind = "object"]', style: { shape: 'hexagon' } },
    { selector: 'node[kind = "unknown"]', style: { shape: 'octagon' } },
    {
      selector: 'edge',
      style: {
        width: 1.5,
        'curve-style': 'bezier',
        'line-color': 'data(colour)',
        'target-arrow-shape': 'triangle',
        'target-arrow-color': 'data(colour)',
        'arrow-scale': 0.8,
        label: 'data(label)',
        color: 'data(colour)',
        'font-size': 10,
        'font-weight': 'bold',
        'min-zoomed-font-size': 9,
        'text-background-color': '#14171c',
        'text-background-opacity': 0.85,
        'text-background-padding': '2px',
        'text-background-shape': 'round-rectangle',
        'text-events': 'yes',
      },
    },
    { selector: 'edge[kind = "learned"]', style: { 'line-style': 'solid' } },
    { selector: 'edge[kind = "rule"]', style: { 'line-style': 'dotted', width: 2 } },
    { selector: 'edge[kind = "audit"]', style: { 'line-style': 'dashed' } },
    { selector: 'edge:selected', style: { width: 3.5 } },
    { selector: 'node:selected', style: { 'border-width': 3, 'border-color': '#ffffff' } },
    { selector: '.faded', style: { opacity: 0.15 } },
    { selector: 'node.match', style: { 'border-width': 4, 'border-color': '#ffffff', 'font-weight': 'bold' } },
  ];
}

/** Above this many edges the renderer trades detail for speed. */
export const LARGE_EDGES = 2000;

/** A layout that stays cheap as the graph grows. */
export function layoutOptions(nodeCount) {
  if (nodeCount <= 250) {
    return {
      name: 'cose',
      animate: false,
      randomize: true,
      numIter: 1000,
      idealEdgeLength: () => 140,
      nodeRepulsion: () => 400000,
      nodeDimensionsIncludeLabels: true,
      componentSpacing: 100,
      padding: 40,
    };
  }
  // Force-directed layouts cost O(n^2) per iteration: for large fleets place
  // nodes in rings by degree (the busiest in the middle), in linear time.
  return {
    name: 'concentric',
    animate: false,
    concentric: (node) => node.degree(),
    levelWidth: () => 4,
    minNodeSpacing: 12,
    padding: 30,
  };
}

/**
 * Applies `graph` to `cy` by difference. Returns what changed. Edges whose
 * ends are missing are left out. New nodes are placed next to a neighbour
 * already shown (or in the middle of the view); the caller decides whether
 * to lay the graph out again.
 */
export function applyGraph(cy, graph) {
  const nodes = new Map();
  for (const node of graph.nodes ?? []) nodes.set(node.id, nodeData(node));
  const edges = new Map();
  for (const edge of graph.edges ?? []) {
    if (nodes.has(edge.source) && nodes.has(edge.target)) edges.set(edge.id, edgeData(edge));
  }
  const changes = { added: 0, updated: 0, removed: 0, addedNodes: 0 };
  cy.batch(() => {
    const gone = cy.collection();
    cy.edges().forEach((edge) => {
      if (!edges.has(edge.id())) gone.merge(edge);
    });
    cy.nodes().forEach((node) => {
      if (!nodes.has(node.id())) gone.merge(node);
    });
    changes.removed = gone.length;
    cy.remove(gone);

    const extent = cy.extent();
    const centre = { x: (extent.x1 + extent.x2) / 2, y: (extent.y1 + extent.y2) / 2 };
    const spread = Math.max(100, Math.min(extent.w, extent.h) / 3);
    const fresh = [];
    for (const [id, data] of nodes) {
      const existing = cy.getElementById(id);
      if (existing.nonempty()) {
        if (existing.data('sig') !== data.sig) {
          existing.data(data);
          changes.updated += 1;
        }
      } else {
        fresh.push(data);
      }
    }
    // Place a new node beside a neighbour that is already on screen.
    const placed = new Map();
    const neighbourOf = new Map();
    for (const data of edges.values()) {
      if (!neighbourOf.has(data.source)) neighbourOf.set(data.source, data.target);
      if (!neighbourOf.has(data.target)) neighbourOf.set(data.target, data.source);
    }
    const additions = fresh.map((data) => {
      const neighbour = neighbourOf.get(data.id);
      const anchorNode = neighbour ? cy.getElementById(neighbour) : null;
      const anchor = anchorNode && anchorNode.nonempty() ? anchorNode.position() : placed.get(neighbour) ?? centre;
      const angle = Math.random() * 2 * Math.PI;
      const radius = anchor === centre ? Math.random() * spread : 80;
      const position = { x: anchor.x + radius * Math.cos(angle), y: anchor.y + radius * Math.sin(angle) };
      placed.set(data.id, position);
      return { group: 'nodes', data, position };
    });
    changes.addedNodes = additions.length;
    for (const [id, data] of edges) {
      const existing = cy.getElementById(id);
      if (existing.nonempty()) {
        if (existing.data('sig') !== data.sig) {
          if (existing.data('source') !== data.source || existing.data('target') !== data.target) {
            // Ends cannot change in place.
            cy.remove(existing);
            additions.push({ group: 'edges', data });
          } else {
            existing.data(data);
          }
          changes.updated += 1;
        }
      } else {
        additions.push({ group: 'edges', data });
      }
    }
    changes.added = additions.length;
    if (additions.length) cy.add(additions);
  });
  return changes;
}
