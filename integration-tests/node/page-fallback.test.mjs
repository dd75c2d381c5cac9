// The chat page when WebSocket cannot get through: in headless Chromium (Debian's, driven by
// playwright-core) with WebSocket blocked it falls back to SockJS by itself; `?transport=`
// forces SockJS or Server-Sent Events. Each chats with a page on plain WebSocket.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { withChromium, screenshots, say, seeMessage, seeNotice } from './chat-page.mjs';
import { startBroker } from './broker.mjs';

const TIMEOUT = 15_000;

const chromium = withChromium();

/** A page that joins `room` as `name`; `blockWebSocket` makes every WebSocket to the
 * broker fail as a proxy that strips `Upgrade` would. */
async function openChat(broker, name, room, { transport, blockWebSocket = false, silentWebSocket = false } = {}) {
  const context = await chromium.browser.newContext({ viewport: { width: 1200, height: 800 } });
  const blocked = [];
  if (blockWebSocket) {
    await context.routeWebSocket(() => true, (ws) => {
      blocked.push(ws.url());
      ws.close({ code: 1006, reason: 'blocked by the test' });
    });
  }
  if (silentWebSocket) {
    // Opens, then never answers: an idle-dropping proxy, or a filter that holds frames.
    await context.routeWebSocket(() => true, (ws) => {
      blocked.push(ws.url());
      ws.onMessage(() => {});
    });
  }
  const page = await context.newPage();
  page.setDefaultTimeout(TIMEOUT);
  page.blocked = blocked;
  const query = new URLSearchParams({ name, room, ...(transport ? { transport } : {}) });
  await page.goto(`http://${broker.http}/?${query}`);
  await page.waitForFunction(() => document.querySelector('[data-testid=connection-status]')?.textContent === 'connected');
  await page.locator(`[data-testid=room-item][data-room="${room}"].active`).waitFor();
  return page;
}

async function transportOf(page) {
  return page.getByTestId('transport').textContent();
}

test('with WebSocket blocked the page falls back to SockJS and chats with a page on WebSocket', async () => {
  const broker = await startBroker();
  const ws = await openChat(broker, 'wendy', 'fallback');
  assert.equal(await transportOf(ws), 'websocket');
  const blocked = await openChat(broker, 'sam', 'fallback', { blockWebSocket: true });
  assert.ok(blocked.blocked.length >= 1, 'the page tried WebSocket first');
  assert.equal(await transportOf(blocked), 'sockjs xhr-streaming');
  await seeNotice(ws, 'sam joined');

  await say(blocked, 'hello over sockjs');
  await seeMessage(ws, 'hello over sockjs', 'sam');
  await say(ws, 'hello back, 안녕 👋');
  await seeMessage(blocked, 'hello back, 안녕 👋', 'wendy');

  mkdirSync(screenshots, { recursive: true });
  await blocked.screenshot({ path: join(screenshots, 'chat-sockjs-fallback.png') });
  await Promise.all([ws, blocked].map((p) => p.context().close()));
  await broker.stop();
});

test('a WebSocket that opens but never reaches CONNECTED is given up after 5 s for SockJS', async () => {
  const broker = await startBroker();
  const started = Date.now();
  const page = await openChat(broker, 'patient', 'slow', { silentWebSocket: true });
  assert.ok(Date.now() - started >= 5000, 'it waited for the WebSocket first');
  assert.ok(page.blocked.length >= 1);
  assert.equal(await transportOf(page), 'sockjs xhr-streaming');
  await page.context().close();
  await broker.stop();
});

test('?transport=sockjs forces SockJS even where WebSocket works', async () => {
  const broker = await startBroker();
  const page = await openChat(broker, 'forced', 'forced', { transport: 'sockjs' });
  assert.match(await transportOf(page), /^sockjs (xhr-streaming|eventsource|xhr-polling)$/);
  const other = await openChat(broker, 'other', 'forced');
  await say(other, 'to the sockjs page');
  await seeMessage(page, 'to the sockjs page', 'other');
  await Promise.all([page, other].map((p) => p.context().close()));
  await broker.stop();
});

test('?transport=sse reads through EventSource and sends through POST', async () => {
  const broker = await startBroker();
  const ws = await openChat(broker, 'walt', 'sse-room');
  await say(ws, 'said before the reader came');
  const sse = await openChat(broker, 'sid', 'sse-room', { transport: 'sse' });
  assert.equal(await transportOf(sse), 'sse');
  // History, then live messages both ways.
  await seeMessage(sse, 'said before the reader came', 'walt');
  await say(ws, 'live to sse');
  await seeMessage(sse, 'live to sse', 'walt');
  await say(sse, 'posted from sse');
  await seeMessage(ws, 'posted from sse', 'sid');
  await seeMessage(sse, 'posted from sse', 'sid');
  await sse.screenshot({ path: join(screenshots, 'chat-sse.png') });
  await Promise.all([ws, sse].map((p) => p.context().close()));
  await broker.stop();
});

test('in Chromium, stomp.js over each SockJS transport (eventsource, htmlfile, xhr and the iframe ones) talks to WebSocket clients', async () => {
  const broker = await startBroker();
  const context = await chromium.browser.newContext();
  const page = await context.newPage();
  page.setDefaultTimeout(TIMEOUT);
  const errors = [];
  page.on('pageerror', (e) => errors.push(String(e)));
  // The chat page, for its vendored stomp.js and sockjs-client and its CSP.
  await page.goto(`http://${broker.http}/`);
  const watcher = await openChat(broker, 'watcher', 'transports');
  const transports = ['xhr-streaming', 'xhr-polling', 'eventsource', 'htmlfile', 'iframe-eventsource', 'iframe-htmlfile', 'iframe-xhr-polling'];
  for (const transport of transports) {
    const result = await page.evaluate(async ([transport, room]) => {
      const used = {};
      const client = new StompJs.Client({
        webSocketFactory: () => {
          const sock = new SockJS(`${location.origin}/ws`, null, { transports: [transport] });
          sock.addEventListener('open', () => { used.transport = sock.transport; });
          return sock;
        },
        connectHeaders: { login: `via-${transport}` },
        reconnectDelay: 0,
        heartbeatIncoming: 0,
        heartbeatOutgoing: 0,
      });
      const heard = [];
      await new Promise((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`no CONNECTED over ${transport}`)), 10000);
        client.onConnect = () => { clearTimeout(timer); resolve(); };
        client.onStompError = (f) => reject(new Error(f.headers.message));
        client.activate();
      });
      await new Promise((resolve) => {
        client.watchForReceipt('in', resolve);
        client.subscribe(`/topic/room.${room}`, (m) => { if (!m.headers['x-event']) heard.push(m.body); }, { receipt: 'in' });
      });
      await new Promise((resolve) => {
        client.watchForReceipt('said', resolve);
        client.publish({ destination: `/topic/room.${room}`, body: `over ${transport}`, headers: { receipt: 'said' } });
      });
      window.stompOver = window.stompOver || {};
      window.stompOver[transport] = { client, heard };
      return used.transport;
    }, [transport, 'transports']);
    assert.equal(result, transport, `sockjs-client used ${result} when asked for ${transport}`);
    await seeMessage(watcher, `over ${transport}`, `via-${transport}`);
    await say(watcher, `back to ${transport}`);
    await page.waitForFunction(([t]) => window.stompOver[t].heard.includes(`back to ${t}`), [transport]);
    await page.evaluate(([t]) => window.stompOver[t].client.deactivate(), [transport]);
  }
  assert.deepEqual(errors, []);
  await Promise.all([context.close(), watcher.context().close()]);
  await broker.stop();
});
