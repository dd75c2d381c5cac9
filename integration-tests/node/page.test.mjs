// The chat page in headless Chromium (Debian's, driven by playwright-core) against the
// real stoa binary.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { withChromium, screenshots, say, seeMessage, seeNotice } from './chat-page.mjs';
import { startBroker, makeClient, connected, publishConfirmed, stoaUsers, hs256 } from './broker.mjs';

const TIMEOUT = 10_000;

const chromium = withChromium();

/** A page that joins `room` as `name` through the /?room=&name= link. */
async function openChat(broker, name, room, viewport = { width: 1200, height: 800 }) {
  const context = await chromium.browser.newContext({ viewport });
  const page = await context.newPage();
  page.setDefaultTimeout(TIMEOUT);
  const dialogs = [];
  page.on('dialog', (d) => { dialogs.push(d.message()); d.dismiss(); });
  page.dialogs = dialogs;
  const query = new URLSearchParams({ name, ...(room ? { room } : {}) });
  await page.goto(`http://${broker.http}/?${query}`);
  await waitStatus(page, 'connected');
  if (room) await page.locator(`[data-testid=room-item][data-room="${room}"].active`).waitFor();
  return page;
}

async function waitStatus(page, status) {
  await page.waitForFunction(
    (s) => document.querySelector('[data-testid=connection-status]')?.textContent === s,
    status,
  );
}

async function members(page) {
  return page.getByTestId('member').allTextContents();
}

test('two users chat both ways; a late joiner sees history; leave notices; escaping; Korean', async () => {
  const broker = await startBroker();
  const alice = await openChat(broker, 'alice', 'lobby');
  const bob = await openChat(broker, 'bob', 'lobby');
  await seeNotice(alice, 'bob joined');

  await say(alice, 'hello bob');
  await seeMessage(bob, 'hello bob', 'alice');
  await say(bob, 'hi alice, 안녕하세요 👋');
  await seeMessage(alice, 'hi alice, 안녕하세요 👋', 'bob');

  await alice.waitForFunction(() => document.querySelectorAll('[data-testid=member]').length === 2);
  assert.deepEqual((await members(alice)).sort(), ['alice', 'bob'], 'the member list includes yourself');

  // Markup in a body is text, never HTML: no element, no script.
  const hostile = '<img src=x onerror=alert(1)>';
  await say(bob, hostile);
  await seeMessage(alice, hostile, 'bob');
  assert.equal(await alice.locator('[data-testid=message-list] img').count(), 0);
  assert.deepEqual(alice.dialogs, [], 'no script ran');

  // Shift+Enter is a new line; Enter sends.
  const input = alice.getByTestId('message-input');
  await input.fill('line one');
  await input.press('Shift+Enter');
  await input.type('line two');
  await input.press('Enter');
  await seeMessage(bob, 'line one\nline two', 'alice');

  // Enter that ends an input method's composition does not send.
  await input.fill('조합 중');
  await alice.evaluate(() => {
    const box = document.querySelector('[data-testid=message-input]');
    box.dispatchEvent(new KeyboardEvent('keydown', { key: 'Enter', isComposing: true, bubbles: true, cancelable: true }));
  });
  assert.equal(await input.inputValue(), '조합 중');

  // A late joiner gets the history, oldest first.
  const carol = await openChat(broker, 'carol', 'lobby');
  await seeMessage(carol, 'hello bob', 'alice');
  await seeMessage(carol, hostile, 'bob');
  const bodies = await carol.getByTestId('message-body').allTextContents();
  assert.deepEqual(bodies.slice(0, 2), ['hello bob', 'hi alice, 안녕하세요 👋']);

  // Leaving posts a notice that names the user.
  await carol.locator('#leave-button').click();
  await seeNotice(alice, 'carol left');
  await alice.waitForFunction(() => document.querySelectorAll('[data-testid=member]').length === 2);

  mkdirSync(screenshots, { recursive: true });
  await alice.screenshot({ path: join(screenshots, 'chat-desktop.png') });
  const phone = await openChat(broker, 'dana', 'lobby', { width: 390, height: 844 });
  await seeMessage(phone, 'hello bob', 'alice');
  await phone.screenshot({ path: join(screenshots, 'chat-phone.png') });
  // On a phone the members are one tap away.
  await phone.locator('#members-button').click();
  await phone.getByTestId('member').filter({ hasText: 'dana' }).waitFor({ state: 'visible' });
  await phone.screenshot({ path: join(screenshots, 'chat-phone-members.png') });

  await Promise.all([alice, bob, carol, phone].map((p) => p.context().close()));
  await broker.stop();
});

test('typing shows in the other page and clears when the message arrives', async () => {
  const broker = await startBroker();
  const alice = await openChat(broker, 'alice', 'typing');
  const bob = await openChat(broker, 'bob', 'typing');
  await bob.getByTestId('message-input').type('still writ');
  await alice.waitForFunction(() => document.querySelector('[data-testid=typing-indicator]').textContent === 'bob is typing…');
  await bob.getByTestId('message-input').type('ing\n');
  await seeMessage(alice, 'still writing', 'bob');
  assert.equal(await alice.getByTestId('typing-indicator').textContent(), '');
  await Promise.all([alice, bob].map((p) => p.context().close()));
  await broker.stop();
});

test('rooms list with member counts, creating rooms, unread counts and direct messages', async () => {
  const broker = await startBroker();
  const alice = await openChat(broker, 'alice', 'lobby');
  const bob = await openChat(broker, 'bob', 'lobby');
  // Alice creates a second room and looks at it; bob talks in the lobby.
  await alice.getByTestId('new-room-input').fill('kitchen');
  await alice.getByTestId('create-room-button').click();
  await alice.locator('[data-testid=room-item][data-room=kitchen].active').waitFor();
  await say(bob, 'one');
  await say(bob, 'two');
  await alice.waitForFunction(() =>
    document.querySelector('[data-testid=room-item][data-room=lobby] [data-testid=unread-count]')?.textContent === '2');
  await alice.locator('[data-testid=room-item][data-room=lobby]').click();
  await seeMessage(alice, 'two', 'bob');
  assert.equal(await alice.locator('[data-testid=room-item][data-room=lobby] [data-testid=unread-count]').textContent(), '');
  // Member counts in the list come from the server.
  await alice.waitForFunction(() =>
    document.querySelector('[data-testid=room-item][data-room=lobby] .count')?.textContent === '2');
  // A direct message: bob clicks alice in the member list and writes.
  await bob.locator('[data-testid=member]', { hasText: 'alice' }).click();
  await say(bob, 'just between us');
  await alice.locator('[data-testid=dm-item][data-user=bob]').click();
  await seeMessage(alice, 'just between us', 'bob');
  await Promise.all([alice, bob].map((p) => p.context().close()));
  await broker.stop();
});

test('after the broker restarts, both pages reconnect and show what was sent meanwhile', async () => {
  let broker = await startBroker();
  const address = broker.http;
  const alice = await openChat(broker, 'alice', 'lobby');
  const bob = await openChat(broker, 'bob', 'lobby');
  await say(alice, 'before the restart');
  await seeMessage(bob, 'before the restart', 'alice');

  // A graceful stop: after kill -9 the last messages may not be committed yet and their
  // x-seq numbers may repeat (PROTOCOL.md, "Keeping"), so a page that saw them would take
  // new messages for ones it has; this test is about the page's reconnection.
  await broker.stop({ keepData: true, signal: 'SIGTERM' });
  await waitStatus(alice, 'reconnecting');
  await waitStatus(bob, 'reconnecting');
  broker = await startBroker([], { http: address, dataDir: broker.dataDir });
  // Someone else talks as soon as the broker is back, before or while the pages return.
  const carol = makeClient(broker.url, { connectHeaders: { login: 'carol' } });
  await connected(carol);
  for (const text of ['sent while you were away 1', 'sent while you were away 2']) {
    await publishConfirmed(carol, { destination: '/topic/room.lobby', body: text });
  }
  for (const page of [alice, bob]) {
    await waitStatus(page, 'connected');
    await seeMessage(page, 'sent while you were away 1', 'carol');
    await seeMessage(page, 'sent while you were away 2', 'carol');
    const bodies = await page.getByTestId('message-body').allTextContents();
    assert.equal(bodies.filter((b) => b === 'before the restart').length, 1, 'nothing shown twice');
  }
  await say(bob, 'and live again');
  await seeMessage(alice, 'and live again', 'bob');
  await carol.deactivate();
  await Promise.all([alice, bob].map((p) => p.context().close()));
  await broker.stop();
});

test('after a long time away, the page catches up through a replay larger than the outbox', async () => {
  // Room for everything below (the default keeps the newest 10,000 messages of a room).
  const broker = await startBroker(['--room-history', '20000']);
  const context = await chromium.browser.newContext({ viewport: { width: 1200, height: 800 } });
  const page = await context.newPage();
  page.setDefaultTimeout(TIMEOUT);
  // The page's WebSocket goes through this route: while offline, every attempt is closed
  // at once, as a broken network would.
  let online = true;
  let current = null;
  await page.routeWebSocket(/\/ws$/, (ws) => {
    if (!online) {
      ws.close({ code: 4000, reason: 'offline' });
      return;
    }
    ws.connectToServer();
    current = ws;
  });
  await page.goto(`http://${broker.http}/?${new URLSearchParams({ name: 'reader', room: 'big' })}`);
  await waitStatus(page, 'connected');
  await page.locator('[data-testid=room-item][data-room="big"].active').waitFor();
  const writer = makeClient(broker.url, { connectHeaders: { login: 'writer' } });
  await connected(writer);
  await publishConfirmed(writer, { destination: '/topic/room.big', body: 'before' });
  await seeMessage(page, 'before', 'writer');

  online = false;
  current.close({ code: 4000, reason: 'network lost' });
  await waitStatus(page, 'reconnecting');
  // 10,000 lines of about 400 bytes while it is away: over 5 MB to replay, more than the
  // broker's 4 MiB outbox.
  const filler = 'x'.repeat(390);
  for (let i = 1; i <= 10_000; i += 1) {
    const params = { destination: '/topic/room.big', body: `line ${i} ${filler}` };
    if (i % 500 === 0) await publishConfirmed(writer, params);
    else writer.publish(params);
  }
  online = true;
  await waitStatus(page, 'connected');
  // Through Playwright's WebSocket route every frame takes a detour: allow it time.
  await page.waitForFunction(
    (last) => [...document.querySelectorAll('[data-testid=message-body]')].some((b) => b.textContent === last),
    `line 10000 ${filler}`,
    { timeout: 60_000 },
  );
  const bodies = await page.getByTestId('message-body').allTextContents();
  const lines = bodies.filter((b) => b.startsWith('line ')).map((b) => Number(b.split(' ')[1]));
  assert.equal(lines.length, 10_000, 'every line, once');
  assert.ok(lines.every((n, i) => n === i + 1), 'in order');
  assert.equal(await page.locator('#room-error').textContent(), '', 'no ERROR reached the page');
  await page.screenshot({ path: join(screenshots, 'replay-after-reconnect.png') });
  await writer.deactivate();
  await context.close();
  await broker.stop();
});

async function loginError(page, text) {
  await page.waitForFunction((t) => document.querySelector('[data-testid=login-error]')?.textContent === t, text);
}

test('users mode: the page asks for a password, refuses a wrong one, honours the ACL and ends on a new password', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'stoa-page-users-'));
  stoaUsers(dir, ['add', '--password-stdin', 'alice'], 'correct horse');
  stoaUsers(dir, ['add', '--password-stdin', 'bob'], 'battery staple');
  const acl = join(dir, 'acl.toml');
  writeFileSync(acl, [
    '[[allow]]', 'users = ["*"]', 'subscribe = ["/topic/room.*", "/user/queue/#"]', 'publish = ["/topic/room.*", "/user/*/queue/*"]',
    '[[deny]]', 'users = ["*"]', 'subscribe = ["/topic/room.staff"]', 'publish = ["/topic/room.staff"]', '',
  ].join('\n'));
  const broker = await startBroker(['--auth', 'users', '--acl', acl, '--auth-failure-delay-ms', '50'], { dataDir: dir });
  const context = await chromium.browser.newContext({ viewport: { width: 1200, height: 800 } });
  const page = await context.newPage();
  page.setDefaultTimeout(TIMEOUT);

  // The link's name is only filled in: nothing connects without the password.
  await page.goto(`http://${broker.http}/?${new URLSearchParams({ name: 'alice', room: 'lobby' })}`);
  await page.getByTestId('password-input').waitFor({ state: 'visible' });
  assert.equal(await page.getByTestId('nickname-input').inputValue(), 'alice');
  assert.equal(await page.getByTestId('connection-status').textContent(), 'disconnected');

  await page.getByTestId('password-input').fill('wrong horse');
  await page.getByTestId('connect-button').click();
  await loginError(page, 'authentication failed');
  assert.equal(await page.locator('#app').isHidden(), true, 'the chat stays closed');

  await page.getByTestId('password-input').fill('correct horse');
  await page.getByTestId('connect-button').click();
  await waitStatus(page, 'connected');
  await page.locator('[data-testid=room-item][data-room="lobby"].active').waitFor();
  // The member list comes from /api/rooms/lobby, which needs the same identity (Basic).
  await page.waitForFunction(() => [...document.querySelectorAll('[data-testid=member]')].some((m) => m.textContent === 'alice'));

  const bob = makeClient(broker.url, { connectHeaders: { login: 'bob', passcode: 'battery staple' } });
  await connected(bob);
  await publishConfirmed(bob, { destination: '/topic/room.lobby', body: 'hi alice' });
  await seeMessage(page, 'hi alice', 'bob');

  // A room the ACL closes: the page says so, forgets it, and is back in the lobby.
  await page.getByTestId('new-room-input').fill('staff');
  await page.getByTestId('create-room-button').click();
  await page.waitForFunction(() => document.querySelector('#room-error')?.textContent === 'You may not enter staff.');
  await waitStatus(page, 'connected');
  await publishConfirmed(bob, { destination: '/topic/room.lobby', body: 'still here?' });
  await page.locator('[data-testid=room-item][data-room="lobby"]').click();
  await seeMessage(page, 'still here?', 'bob');
  assert.equal(await page.locator('[data-testid=room-item][data-room="staff"]').count(), 0, 'no denied room listed');

  // A new password ends the live session: the page is back at the form, with the reason.
  stoaUsers(dir, ['passwd', '--password-stdin', 'alice'], 'new horse');
  await loginError(page, 'session revoked');
  await page.getByTestId('password-input').waitFor({ state: 'visible' });
  await page.screenshot({ path: join(screenshots, 'users-revoked.png') });
  await bob.deactivate();
  await context.close();
  await broker.stop();
});

test('jwt mode: the token comes from the fragment, leaves the address bar, and an expired one says so', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'stoa-page-jwt-'));
  const secret = 'a secret of at least thirty-two bytes, for HS256';
  writeFileSync(join(dir, 'jwt.secret'), secret);
  const broker = await startBroker(
    ['--auth', 'jwt', '--jwt-secret-file', join(dir, 'jwt.secret'), '--auth-failure-delay-ms', '50'],
    { dataDir: dir },
  );
  const context = await chromium.browser.newContext({ viewport: { width: 1200, height: 800 } });
  const page = await context.newPage();
  page.setDefaultTimeout(TIMEOUT);
  const requested = [];
  page.on('request', (request) => requested.push(request.url()));
  const token = hs256(secret, 'carol', 3600);

  await page.goto(`http://${broker.http}/?room=lobby#token=${token}`);
  await waitStatus(page, 'connected');
  await page.locator('[data-testid=room-item][data-room="lobby"].active').waitFor();
  assert.equal(await page.locator('#me').textContent(), 'carol', 'the name is the token\'s subject');
  assert.equal(new URL(page.url()).hash, '', 'the token left the address bar');
  assert.equal(await page.evaluate(() => sessionStorage.getItem('stoa.token')), token);
  await page.waitForFunction(() => [...document.querySelectorAll('[data-testid=member]')].some((m) => m.textContent === 'carol'));
  await say(page, 'signed by a token');
  await seeMessage(page, 'signed by a token', 'carol');
  // A reload keeps the session: the token is in this tab's sessionStorage.
  await page.reload();
  await waitStatus(page, 'connected');
  assert.ok(requested.every((url) => !url.includes(token)), 'the token never went into a URL');

  // An expired token: refused, and the page tells the person why.
  const late = await context.newPage();
  late.setDefaultTimeout(TIMEOUT);
  await late.goto(`http://${broker.http}/#token=${hs256(secret, 'dave', -600)}`);
  await loginError(late, 'token expired');
  assert.equal(await late.getByTestId('connection-status').textContent(), 'disconnected');
  assert.equal(await late.evaluate(() => sessionStorage.getItem('stoa.token')), null, 'the dead token is dropped');

  // No token at all: the form explains where one comes from.
  const none = await context.newPage();
  none.setDefaultTimeout(TIMEOUT);
  await none.goto(`http://${broker.http}/`);
  await none.locator('#token-help').waitFor({ state: 'visible' });
  assert.equal(await none.getByTestId('nickname-input').isHidden(), true);
  await none.getByTestId('connect-button').click();
  await loginError(none, 'No token: open the link your sign-in service gave you.');
  await context.close();
  await broker.stop();
});
