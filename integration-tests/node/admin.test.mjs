// The operator's dashboard at /admin in headless Chromium (Debian's, driven by playwright-core):
// its figures and charts follow real stomp.js traffic, and a session closed from the page is
// closed (the client gets the ERROR), after a confirmation that can also be declined.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { withChromium, screenshots } from './chat-page.mjs';
import {
  startBroker, makeClient, connected, subscribeConfirmed, publishConfirmed, withTimeout, stoaUsers,
} from './broker.mjs';

const TIMEOUT = 15_000;

const chromium = withChromium();

/** The number a hook shows (the first, for `in / out`). */
async function figure(page, testid) {
  const text = await page.getByTestId(testid).textContent();
  return Number(text.split('/')[0].replace(/[^0-9.]/g, ''));
}

test('the dashboard follows the traffic and closes a session after asking', async () => {
  const broker = await startBroker();
  const page = await (await chromium.browser.newContext({ viewport: { width: 1400, height: 1000 } })).newPage();
  const errors = [];
  page.on('pageerror', (e) => errors.push(e.message));
  await page.goto(`http://${broker.http}/admin`);
  await page.waitForSelector('[data-testid=admin-status][data-state=live]', { timeout: TIMEOUT });
  assert.equal(await figure(page, 'admin-connections'), 0, 'nobody connected yet');

  // Two chatters: one to be closed, one who keeps talking.
  const victim = makeClient(broker.url, { connectHeaders: { login: 'victim' } });
  const victimClosed = new Promise((resolve) => {
    victim.onWebSocketClose = (event) => resolve(event.code);
  });
  await connected(victim);
  // After connected(), which handles ERRORs while connecting.
  const victimError = new Promise((resolve) => {
    victim.onStompError = (frame) => resolve(frame.headers.message);
  });
  await subscribeConfirmed(victim, '/topic/room.lobby', () => {});
  const talker = makeClient(broker.url, { connectHeaders: { login: 'talker' } });
  await connected(talker);

  await page.waitForFunction(() => Number(document.querySelector('[data-testid=admin-connections]').textContent) === 2,
    null, { timeout: TIMEOUT });
  // The charts move: messages per second shows the traffic while it flows.
  let sent = 0;
  const flow = setInterval(() => {
    if (sent < 400) {
      talker.publish({ destination: '/topic/room.lobby', body: `m${sent}` });
      sent += 1;
    }
  }, 20);
  try {
    await page.waitForFunction(() => {
      const [inRate, outRate] = document.querySelector('[data-testid=admin-rate]').textContent.split('/').map(Number);
      return inRate > 0 && outRate > 0;
    }, null, { timeout: TIMEOUT });
    await page.waitForFunction(() => !document.querySelector('[data-testid=admin-latency]').textContent.startsWith('–'),
      null, { timeout: TIMEOUT });
  } finally {
    clearInterval(flow);
  }
  for (const chart of ['connections', 'rate', 'latency', 'trouble']) {
    assert.equal(await page.locator(`[data-testid=admin-chart-${chart}] canvas`).count(), 1, `${chart} chart drawn`);
  }
  // And they move: a new sample a second.
  const samples = Number(await page.getByTestId('admin-chart-rate').getAttribute('data-samples'));
  await page.waitForFunction((n) => Number(document.querySelector('[data-testid=admin-chart-rate]').dataset.samples) > n,
    samples, { timeout: TIMEOUT });

  // The sessions table: who, over what, in which room.
  const row = page.locator('[data-testid=admin-sessions] tr[data-user=victim]');
  await row.waitFor({ timeout: TIMEOUT });
  assert.match(await row.textContent(), /ws.*127\.0\.0\.1:\d+.*\/topic\/room\.lobby/);
  assert.ok(await page.locator('[data-testid=admin-rooms] tr[data-room=lobby]').count() === 1, 'the room is listed');
  mkdirSync(screenshots, { recursive: true });
  await page.screenshot({ path: join(screenshots, 'admin.png'), fullPage: true });

  // Declined: nothing happens.
  await row.getByTestId('admin-close-session').click();
  await page.getByTestId('admin-confirm').waitFor({ state: 'visible' });
  assert.match(await page.getByTestId('admin-confirm').textContent(), /Close session \d+ of victim/);
  await page.getByTestId('admin-confirm-cancel').click();
  await publishConfirmed(victim, { destination: '/topic/room.lobby', body: 'still here' });

  // Confirmed: the client gets the ERROR and its connection closes; the page says so.
  await row.getByTestId('admin-close-session').click();
  await page.getByTestId('admin-confirm-ok').click();
  assert.equal(await withTimeout(victimError, 'the ERROR'), 'session closed by an operator');
  await withTimeout(victimClosed, 'the close');
  await page.waitForFunction(() => document.querySelector('[data-testid=admin-action-result]').textContent.endsWith('closed'),
    null, { timeout: TIMEOUT });
  await page.locator('[data-testid=admin-sessions] tr[data-user=victim]').waitFor({ state: 'detached', timeout: TIMEOUT });
  await page.waitForFunction(() => Number(document.querySelector('[data-testid=admin-connections]').textContent) === 1,
    null, { timeout: TIMEOUT });
  // The other session went on.
  await publishConfirmed(talker, { destination: '/topic/room.lobby', body: 'after' });
  victim.deactivate();
  assert.deepEqual(errors, [], 'no script errors on the page');
  await broker.stop();
});

test('with accounts the browser logs in, and only group admin gets the dashboard', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'stoa-admin-users-'));
  stoaUsers(dir, ['add', '--password-stdin', '--group', 'admin', 'boss'], 'boss pw');
  stoaUsers(dir, ['add', '--password-stdin', 'pleb'], 'pleb pw');
  const broker = await startBroker(['--auth', 'users', '--auth-failure-delay-ms', '0'], { dataDir: dir });
  const nobody = await chromium.browser.newContext();
  // A navigation would open the browser's login prompt, which headless Chromium cancels.
  assert.equal((await nobody.request.get(`http://${broker.http}/admin`)).status(), 401, 'asked to log in');
  const pleb = await chromium.browser.newContext({ httpCredentials: { username: 'pleb', password: 'pleb pw' } });
  assert.equal((await (await pleb.newPage()).goto(`http://${broker.http}/admin`)).status(), 403, 'not an operator');
  const boss = await chromium.browser.newContext({ httpCredentials: { username: 'boss', password: 'boss pw' } });
  const page = await boss.newPage();
  assert.equal((await page.goto(`http://${broker.http}/admin`)).status(), 200);
  // The page's own requests carry the login the browser was given.
  await page.waitForSelector('[data-testid=admin-status][data-state=live]', { timeout: TIMEOUT });
  const client = makeClient(broker.url, { connectHeaders: { login: 'pleb', passcode: 'pleb pw' } });
  await connected(client);
  await page.locator('[data-testid=admin-sessions] tr[data-user=pleb]').waitFor({ timeout: TIMEOUT });
  assert.match(await page.locator('#node').textContent(), /auth users/);
  await Promise.all([nobody.close(), pleb.close(), boss.close()]);
  await broker.stop();
});
