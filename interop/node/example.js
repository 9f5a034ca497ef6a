#!/usr/bin/env node
// @ts-check
/**
 * Holds one heartbeat session until SIGINT or SIGTERM, then says goodbye.
 *
 *     node example.js --target 127.0.0.1:50051 --client-id w1 --label zone=eu
 *
 * Prints what happens to the session (connected, rotations, round trips,
 * losses and reconnects) as text, or with --json one JSON object a line for scripts.
 * Exits 0 after a clean goodbye, 2 on bad arguments.
 */
'use strict';

const fs = require('node:fs');
const { parseArgs } = require('node:util');
const grpc = require('@grpc/grpc-js');
const { Session } = require('./index.js');

const USAGE = `usage: node example.js [--target HOST:PORT] [--client-id ID] [--label KEY=VALUE]...
                       [--ca-file PEM] [--token-file FILE] [--no-pings] [--json]

Hold a heartbeat.v1 session until SIGINT or SIGTERM, then say goodbye and exit 0.

  --target HOST:PORT   server address (default 127.0.0.1:50051)
  --client-id ID       the id presence shows for this client (default: anonymous)
  --label KEY=VALUE    a label for presence; repeatable
  --ca-file PEM        connect with TLS, trusting the CA certificates in this file
  --token-file FILE    a file holding this client's bearer token (or set HEARTBEAT_TOKEN);
                       needed when the server checks client credentials
  --no-pings           only answer the server's pings; measure no round trips
  --json               print one JSON object a line instead of text`;

/** @param {string} message @returns {never} */
function usage(message) {
  console.error(`${message}\n\n${USAGE}`);
  process.exit(2);
}

/** @param {string} flag @param {string} file @param {string} what */
function readFile(flag, file, what) {
  try {
    return fs.readFileSync(file);
  } catch (error) {
    return usage(`${flag} ${file}: ${/** @type {Error} */ (error).message}; give a readable file holding ${what}`);
  }
}

function parse() {
  /** @type {ReturnType<typeof parseArgs>} */
  let parsed;
  try {
    parsed = parseArgs({
      options: {
        target: { type: 'string', default: '127.0.0.1:50051' },
        'client-id': { type: 'string', default: '' },
        label: { type: 'string', multiple: true, default: [] },
        'ca-file': { type: 'string' },
        'token-file': { type: 'string' },
        'no-pings': { type: 'boolean', default: false },
        json: { type: 'boolean', default: false },
        help: { type: 'boolean', short: 'h', default: false },
      },
    });
  } catch (error) {
    return usage(/** @type {Error} */ (error).message);
  }
  const values = /** @type {Record<string, any>} */ (parsed.values);
  if (values.help) {
    console.log(USAGE);
    process.exit(0);
  }
  /** @type {Record<string, string>} */
  const labels = {};
  for (const text of values.label) {
    const at = text.indexOf('=');
    if (at <= 0) usage(`label '${text}' is not KEY=VALUE; write it like zone=eu`);
    labels[text.slice(0, at)] = text.slice(at + 1);
  }
  let token = process.env.HEARTBEAT_TOKEN || undefined;
  if (values['token-file'] !== undefined) {
    token = readFile('--token-file', values['token-file'], 'the token').toString().trim();
    if (!token) usage(`--token-file ${values['token-file']} is empty; put the bearer token in it`);
  }
  const credentials =
    values['ca-file'] === undefined ? undefined : grpc.credentials.createSsl(readFile('--ca-file', values['ca-file'], 'CA certificates (PEM)'));
  return {
    target: /** @type {string} */ (values.target),
    options: { clientId: values['client-id'], labels, credentials, token, sendPings: !values['no-pings'] },
    json: /** @type {boolean} */ (values.json),
  };
}

/** Field names that differ from the Python events' (`Rotated.from_session_id`). */
const PYTHON_NAMES = /** @type {Record<string, string>} */ ({ from: 'from_session_id', to: 'to_session_id' });

/**
 * The event as the Python example prints it with --json: seconds, snake_case.
 * @param {string} name @param {any} event
 */
function asJson(name, event) {
  /** @type {Record<string, any>} */
  const fields = { event: name };
  for (const [key, value] of Object.entries(event)) {
    const snake = PYTHON_NAMES[key] ?? key.replace(/[A-Z]/g, (letter) => `_${letter.toLowerCase()}`);
    if (snake.endsWith('_ms')) fields[snake.slice(0, -3)] = value === null ? null : value / 1000;
    else fields[snake] = value;
  }
  return JSON.stringify(fields);
}

/** @param {string} name @param {any} event */
function describe(name, event) {
  switch (name) {
    case 'connected':
      return `connected: session ${event.sessionId} (ping every ${event.pingIntervalMs / 1000} s, timeout ${event.timeoutMs / 1000} s)`;
    case 'rotated':
      return `rotated: session ${event.from} -> ${event.to} (ping every ${event.pingIntervalMs / 1000} s, timeout ${event.timeoutMs / 1000} s)`;
    case 'rtt':
      return `rtt ${event.rttMs.toFixed(2)} ms (smoothed ${event.smoothedMs.toFixed(2)} ms)`;
    case 'lost':
      return `lost (${event.kind}): ${event.goodbye ?? event.code ?? event.kind} ${event.message}`.trimEnd();
    case 'reconnecting':
      return `reconnecting in ${(event.delayMs / 1000).toFixed(2)} s (attempt ${event.attempt})`;
    default:
      return event.replaced ? 'replaced by a newer session with this client id' : 'closed';
  }
}

const { target, options, json } = parse();
/** @type {Session} */
let session;
try {
  session = new Session(target, options);
} catch (error) {
  usage(`--target ${target}: ${/** @type {Error} */ (error).message}; write it as HOST:PORT`);
}
for (const name of ['connected', 'rotated', 'rtt', 'lost', 'reconnecting', 'closed']) {
  session.on(name, (event) => console.log(json ? asJson(name, event) : describe(name, event)));
}
for (const signal of /** @type {const} */ (['SIGINT', 'SIGTERM'])) {
  process.on(signal, () => session.close());
}
session.start().running?.then(() => process.exit(0));
