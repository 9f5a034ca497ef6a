// Drives Debian's Chromium for tests/browser.rs, one JSON object a line each
// way: commands on stdin, what the pages report on stdout. The assertions
// live in the Rust test; this only does what it is told and says what it saw.
//
//   node driver.mjs --web http://127.0.0.1:PORT --app http://127.0.0.1:PORT [--lifecycle on]
//
// With --lifecycle, Chromium is started here and Playwright attaches to it
// over CDP without its default overrides: its focus emulation otherwise
// keeps every page visible, which makes Page.setWebLifecycleState a no-op.
// Its pages share one window, so only the last opened is visible; tests that
// need several visible tabs use the default launch.
//
// A "tab" is a page at the app origin (served here, on loopback, so that
// Chromium's local network access rules let it reach the server) that imports the server's /heartbeat.js and holds one HeartbeatSession,
// reporting each of its events; or the server's presence page.
import { chromium } from 'playwright-core';
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';

const args = Object.fromEntries(
  process.argv.slice(2).reduce((pairs, arg, i, all) => (arg.startsWith('--') ? [...pairs, [arg.slice(2), all[i + 1]]] : pairs), []),
);
const web = args.web;
const app = args.app;
const say = (object) => process.stdout.write(`${JSON.stringify(object)}\n`);

const executablePath = process.env.CHROMIUM ?? '/usr/bin/chromium';
const flags = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'];
let browser;
let context;
let chromiumProcess = null;
let profile = '';
if (args.lifecycle) {
  profile = mkdtempSync(join(tmpdir(), 'heartbeat-chromium-'));
  chromiumProcess = spawn(executablePath, ['--headless', ...flags, '--remote-debugging-port=0', `--user-data-dir=${profile}`, 'about:blank'], {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  const endpoint = await new Promise((resolve, reject) => {
    let text = '';
    chromiumProcess.stderr.on('data', (chunk) => {
      text += chunk;
      const found = /DevTools listening on (ws:\S+)/.exec(text);
      if (found) resolve(found[1]);
    });
    chromiumProcess.on('exit', (code) => reject(new Error(`chromium exited (${code}): ${text}`)));
  });
  browser = await chromium.connectOverCDP(endpoint, { noDefaults: true });
  context = browser.contexts()[0];
} else {
  browser = await chromium.launch({ executablePath, args: flags });
  context = await browser.newContext();
}
// The app's page: a module that opens a session as the query string says.
const APP_PAGE = `<!doctype html><meta charset="utf-8"><title>app</title>
<script type="module">
  import { HeartbeatSession } from '${web}/heartbeat.js';
  const options = JSON.parse(decodeURIComponent(location.hash.slice(1)));
  const session = new HeartbeatSession('${web.replace(/^http/, 'ws')}/v1/heartbeat', options);
  for (const type of ['connected', 'rtt', 'rotated', 'lost', 'reconnecting', 'closed']) {
    session.addEventListener(type, (event) => window.report({ event: type, detail: event.detail }));
  }
  window.session = session;
  session.start();
</script>`;
const appServer = createServer((request, response) => {
  response.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
  response.end(APP_PAGE);
});
await new Promise((resolve) => appServer.listen(Number(new URL(app).port), '127.0.0.1', resolve));

/** @type {Map<string, import('playwright-core').Page>} */
const tabs = new Map();

async function open(command) {
  const page = await context.newPage();
  tabs.set(command.tab, page);
  page.on('console', (message) => say({ tab: command.tab, console: message.text() }));
  page.on('pageerror', (error) => say({ tab: command.tab, pageerror: String(error) }));
  await page.exposeFunction('report', (report) => say({ tab: command.tab, at: performance.now(), ...report }));
  const options = { clientId: command.clientId, labels: command.labels ?? {}, encoding: command.encoding, token: command.token };
  await page.goto(`${app}/#${encodeURIComponent(JSON.stringify(options))}`);
}

async function presence(command) {
  const page = await context.newPage();
  tabs.set(command.tab, page);
  page.on('pageerror', (error) => say({ tab: command.tab, pageerror: String(error) }));
  if (command.token) await page.addInitScript((token) => sessionStorage.setItem('heartbeat-admin-token', token), command.token);
  await page.goto(command.url ?? `${web}/`);
}

/** Sets what `document.hidden` says and tells the page, as a tab switch does. */
async function visibility(page, hidden) {
  await page.evaluate((hidden) => {
    Object.defineProperty(document, 'hidden', { configurable: true, get: () => hidden });
    Object.defineProperty(document, 'visibilityState', { configurable: true, get: () => (hidden ? 'hidden' : 'visible') });
    document.dispatchEvent(new Event('visibilitychange'));
  }, hidden);
}

const commands = {
  open,
  presence,
  close: async ({ tab }) => tabs.get(tab).evaluate(() => window.session.close()),
  closeTab: async ({ tab }) => tabs.get(tab).close(),
  freeze: async ({ tab }) => {
    const cdp = await context.newCDPSession(tabs.get(tab));
    await cdp.send('Page.setWebLifecycleState', { state: 'frozen' });
  },
  hide: async ({ tab }) => visibility(tabs.get(tab), true),
  show: async ({ tab }) => visibility(tabs.get(tab), false),
  // Waits for a selector on a tab and reports how long that took.
  wait: async ({ tab, selector, timeoutMs }) => {
    const started = performance.now();
    await tabs.get(tab).waitForSelector(selector, { timeout: timeoutMs, state: 'attached' });
    return { ms: performance.now() - started };
  },
  text: async ({ tab, selector }) => ({ text: await tabs.get(tab).locator(selector).first().textContent() }),
  click: async ({ tab, selector }) => tabs.get(tab).click(selector),
};

say({ ready: true });
for await (const line of createInterface({ input: process.stdin })) {
  const command = JSON.parse(line);
  try {
    const result = await commands[command.cmd](command);
    say({ id: command.id, ok: true, ...(result ?? {}) });
  } catch (error) {
    say({ id: command.id, ok: false, error: String(error) });
  }
}
await browser.close();
if (chromiumProcess) {
  const exited = new Promise((resolve) => chromiumProcess.once('exit', resolve));
  chromiumProcess.kill();
  await exited;
  rmSync(profile, { recursive: true, force: true });
}
appServer.close();
