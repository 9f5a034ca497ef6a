// @ts-check
/**
 * Drives the server from Node for the project's interop tests, with the same
 * subcommands and output as ../python/conformance.py: one JSON object a line,
 * `t` in seconds since the start.
 *
 *     raw    a session on the loaded .proto alone, with chosen behaviour:
 *            --answer, --ping SEQ (repeatable), --flood, --goodbye-after S.
 *     watch  the package's presence watcher; each event, and with --views
 *            the watcher's view after it.
 */
'use strict';

const fs = require('node:fs');
const { parseArgs } = require('node:util');
const grpc = require('@grpc/grpc-js');
const { PresenceWatcher, bearer, durationMs, loadServices, statusName } = require('./index.js');

const start = performance.now();
/** @param {Record<string, unknown>} fields */
function out(fields) {
  console.log(JSON.stringify({ ...fields, t: Math.round((performance.now() - start) * 1000) / 1e6 }));
}

const [command, ...rest] = process.argv.slice(2);
const { values } = parseArgs({
  args: rest,
  options: {
    target: { type: 'string' },
    'ca-file': { type: 'string' },
    'token-file': { type: 'string' },
    'client-id': { type: 'string', default: '' },
    answer: { type: 'boolean', default: false },
    ping: { type: 'string', multiple: true, default: [] },
    flood: { type: 'boolean', default: false },
    'goodbye-after': { type: 'string' },
    views: { type: 'boolean', default: false },
  },
});
const target = values.target ?? '127.0.0.1:50051';
const credentials = values['ca-file'] ? grpc.credentials.createSsl(fs.readFileSync(values['ca-file'])) : grpc.credentials.createInsecure();
const secret = values['token-file'] ? fs.readFileSync(values['token-file']).toString().trim() : undefined;

function raw() {
  const services = loadServices();
  const client = new services.HeartbeatService(target, credentials);
  const call = /** @type {grpc.ClientDuplexStream<any, any>} */ (/** @type {any} */ (client).Heartbeat(bearer(secret)));
  let flooding = false;
  const flood = () => {
    // Writes as fast as the stream takes them, until the call ends.
    let seq = 0;
    flooding = true;
    const more = () => {
      while (flooding && call.write({ ping: { seq: ++seq } }));
      if (flooding) call.once('drain', more);
    };
    more();
  };
  call.on('data', (/** @type {any} */ response) => {
    switch (response.frame) {
      case 'welcome': {
        const welcome = response.welcome;
        out({
          frame: 'welcome',
          session_id: welcome.sessionId,
          ping_interval: durationMs(welcome.pingInterval) / 1000,
          timeout: durationMs(welcome.timeout) / 1000,
        });
        for (const seq of values.ping ?? []) call.write({ ping: { seq: Number(seq) } });
        if (values.flood) flood();
        if (values['goodbye-after'] !== undefined) {
          setTimeout(() => {
            call.write({ goodbye: { reason: 'GOODBYE_REASON_CLIENT_SHUTDOWN' } });
            call.end();
            out({ sent: 'goodbye' });
          }, Number(values['goodbye-after']) * 1000);
        }
        break;
      }
      case 'ping':
        out({ frame: 'ping', seq: response.ping.seq });
        if (values.answer) call.write({ pong: { seq: response.ping.seq } });
        break;
      case 'pong':
        out({ frame: 'pong', seq: response.pong.seq });
        break;
      case 'goodbye':
        out({ frame: 'goodbye', reason: response.goodbye.reason, message: response.goodbye.message });
        break;
    }
  });
  call.on('error', () => {});
  call.on('status', (/** @type {grpc.StatusObject} */ status) => {
    flooding = false;
    out({ end: statusName(status.code), details: status.details });
    client.close();
    process.exit(0);
  });
  out({ sent: 'hello' }); // just before: the server gets it no earlier
  call.write({ hello: { clientId: values['client-id'] } });
}

async function watch() {
  const watcher = new PresenceWatcher(target, { credentials, adminToken: secret });
  for await (const event of watcher.events()) {
    if (event.type === 'opened' || event.type === 'suspected' || event.type === 'recovered') {
      out({ event: event.type, session_id: event.session.sessionId, client_id: event.session.clientId, revision: event.revision });
    } else if (event.type === 'closed') {
      out({ event: 'closed', session_id: event.session.sessionId, client_id: event.session.clientId, reason: event.reason, revision: event.revision });
    } else if (event.type === 'synced') {
      out({ event: 'synced', epoch: event.epoch, revision: event.revision });
    } else if (event.type === 'reset') {
      out({ event: 'reset', revision: event.revision });
    } else if (event.type === 'interrupted') {
      out({ event: 'interrupted', code: event.code, retry_in: event.retryInMs / 1000 });
    }
    if (values.views) out({ event: 'view', epoch: watcher.epoch, revision: watcher.revision, sessions: [...watcher.sessions.keys()].sort() });
  }
}

if (command === 'raw') raw();
else if (command === 'watch') watch();
else {
  console.error('usage: node conformance.js raw|watch --target HOST:PORT [options]');
  process.exit(2);
}
