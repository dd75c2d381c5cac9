// @stomp/stompjs 7 (over the `ws` package) against the real stoa binary.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  startBroker, makeClient, connected, collect, publishConfirmed, subscribeConfirmed, withTimeout, Inbox, stopAll, stoaUsers, hs256,
} from './broker.mjs';

after(stopAll);

test('heart-beats 10000/10000 are negotiated, and fast beats keep an idle connection up', async () => {
  const broker = await startBroker();
  const client = makeClient(broker.url, { heartbeatIncoming: 10000, heartbeatOutgoing: 10000 });
  const frame = await connected(client);
  assert.equal(frame.headers.version, '1.2');
  assert.equal(frame.headers['heart-beat'], '10000,10000');
  await client.deactivate();
  await broker.stop();

  // 200 ms both ways: stomp.js drops a server silent for 2x, stoa a client silent for 3x.
  const fast = await startBroker(['--heart-beat', '200,200']);
  let closes = 0;
  const idle = makeClient(fast.url, {
    heartbeatIncoming: 200, heartbeatOutgoing: 200, onWebSocketClose: () => { closes += 1; },
  });
  await connected(idle);
  // Idle for ten intervals: only heart-beats flow, and neither side gives up.
  await new Promise((resolve) => setTimeout(resolve, 2000));
  assert.equal(closes, 0, 'the idle connection was dropped');
  const { done } = collect(idle, '/topic/t.alive', 1, { receipt: 'alive' });
  await withTimeout(new Promise((resolve) => idle.watchForReceipt('alive', resolve)), 'the subscription');
  const publisher = makeClient(fast.url);
  await connected(publisher);
  await publishConfirmed(publisher, { destination: '/topic/t.alive', body: 'still here' });
  assert.equal((await done)[0].body, 'still here');
  await idle.deactivate();
  await publisher.deactivate();
  await fast.stop();
});

test('a 1 MB message sent with splitLargeFrames arrives whole', async () => {
  const broker = await startBroker();
  const reader = makeClient(broker.url);
  await connected(reader);
  const inbox = new Inbox();
  await subscribeConfirmed(reader, '/topic/t.large', (m) => inbox.push(m));
  const writer = makeClient(broker.url, { splitLargeFrames: true, maxWebSocketChunkSize: 8 * 1024 });
  await connected(writer);
  const body = Array.from({ length: 1024 * 1024 }, (_, i) => String.fromCharCode(97 + (i % 26))).join('');
  await publishConfirmed(writer, { destination: '/topic/t.large', body });
  const got = await inbox.until((items) => items.length >= 1, 'the large message');
  assert.equal(got[0].body.length, body.length);
  assert.equal(got[0].body, body);
  await reader.deactivate();
  await writer.deactivate();
  await broker.stop();
});

test('a binary body arrives as bytes in a binary WebSocket message', async () => {
  const broker = await startBroker();
  const reader = makeClient(broker.url);
  await connected(reader);
  const { done } = collect(reader, '/topic/t.bytes', 1, { receipt: 'r' });
  await new Promise((resolve) => reader.watchForReceipt('r', resolve));
  const writer = makeClient(broker.url);
  await connected(writer);
  const bytes = new Uint8Array([0, 255, 1, 128, 0, 200, 10, 13]);
  await publishConfirmed(writer, {
    destination: '/topic/t.bytes', binaryBody: bytes, headers: { 'content-type': 'application/octet-stream' },
  });
  const [message] = await done;
  assert.equal(message.isBinaryBody, true);
  assert.deepEqual(Array.from(message.binaryBody), Array.from(bytes));
  assert.equal(message.headers['content-type'], 'application/octet-stream');
  await reader.deactivate();
  await writer.deactivate();
  await broker.stop();
});

test('50 clients in one room each receive every message in order, numbered by x-seq', async () => {
  const broker = await startBroker();
  const total = 200;
  const clients = [];
  const inboxes = [];
  for (let i = 0; i < 50; i += 1) {
    const client = makeClient(broker.url, { connectHeaders: { login: `user${i}` } });
    await connected(client);
    const inbox = new Inbox();
    inboxes.push(inbox);
    // Later joiners' join notices arrive too; chat messages are the ones without x-event.
    await subscribeConfirmed(client, '/topic/room.fifty', (m) => {
      if (!m.headers['x-event']) inbox.push({ body: m.body, seq: Number(m.headers['x-seq']) });
    });
    clients.push(client);
  }
  const publisher = makeClient(broker.url, { connectHeaders: { login: 'host' } });
  await connected(publisher);
  for (let n = 0; n < total; n += 1) {
    publisher.publish({ destination: '/topic/room.fifty', body: `message ${n}` });
  }
  await publishConfirmed(publisher, { destination: '/topic/room.fifty', body: 'end' });
  const expected = [...Array.from({ length: total }, (_, n) => `message ${n}`), 'end'];
  for (const inbox of inboxes) {
    const got = await inbox.until((items) => items.length >= expected.length, 'every message');
    assert.deepEqual(got.map((m) => m.body), expected);
    for (let i = 1; i < got.length; i += 1) assert.equal(got[i].seq, got[i - 1].seq + 1);
  }
  await Promise.all([...clients, publisher].map((c) => c.deactivate()));
  await broker.stop();
});

test('a client reconnects after the socket drops and its onConnect subscribes again', async () => {
  let broker = await startBroker();
  const address = broker.http;
  let connects = 0;
  let resubscribed;
  const inbox = new Inbox();
  const client = makeClient(broker.url, { reconnectDelay: 100 });
  client.onConnect = async () => {
    connects += 1;
    // stomp.js does not resubscribe by itself: apps subscribe in onConnect.
    await subscribeConfirmed(client, '/topic/t.again', (m) => inbox.push(m.body));
    resubscribed?.();
  };
  await new Promise((resolve) => { resubscribed = resolve; client.activate(); });
  const back = new Promise((resolve) => { resubscribed = resolve; });
  // The broker dies; a new one comes up on the same address.
  await broker.stop({ keepData: true });
  broker = await startBroker([], { http: address, dataDir: broker.dataDir });
  await withTimeout(back, 'the reconnect');
  assert.equal(connects, 2);
  const publisher = makeClient(broker.url);
  await connected(publisher);
  await publishConfirmed(publisher, { destination: '/topic/t.again', body: 'after the restart' });
  const bodies = await inbox.until((items) => items.length >= 1, 'the message after reconnecting');
  assert.deepEqual(bodies, ['after the restart']);
  await client.deactivate();
  await publisher.deactivate();
  await broker.stop();
});

test('jwt: a session whose token expires gets "token expired", and beforeConnect brings a fresh one', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'stoa-node-jwt-'));
  const secret = 'the HMAC secret of this test, long enough for HS256';
  writeFileSync(join(dir, 'secret'), secret);
  const broker = await startBroker(['--auth', 'jwt', '--jwt-secret-file', join(dir, 'secret')], { dataDir: dir });
  // The broker allows 30 s of leeway past `exp`: this first token has about 2 s left.
  const tokens = [hs256(secret, 'erin', -28), hs256(secret, 'erin', 3600)];
  const errors = [];
  const names = [];
  const inbox = new Inbox();
  let ready;
  const client = makeClient(broker.url, { reconnectDelay: 100 });
  client.beforeConnect = () => {
    // What a page does: ask its sign-in service for a token before every (re)connect.
    client.connectHeaders = { passcode: tokens.shift() };
  };
  client.onStompError = (frame) => errors.push(frame.headers.message);
  client.onConnect = async (frame) => {
    names.push(frame.headers['user-name']);
    await subscribeConfirmed(client, '/topic/room.jwt', (m) => {
      if (!m.headers['x-event']) inbox.push(m);
    });
    ready?.();
  };
  await withTimeout(new Promise((resolve) => { ready = resolve; client.activate(); }), 'the first session');
  const again = new Promise((resolve) => { ready = resolve; });
  await withTimeout(again, 'the session with the fresh token', 15_000);
  assert.deepEqual(errors, ['token expired']);
  assert.deepEqual(names, ['erin', 'erin']);
  // The renewed session works, and its messages carry the token's name, whatever was sent.
  await publishConfirmed(client, { destination: '/topic/room.jwt', body: 'renewed', headers: { 'x-sender': 'mallory' } });
  const [message] = await inbox.until((items) => items.length >= 1, 'the message of the renewed session');
  assert.equal(message.body, 'renewed');
  assert.equal(message.headers['x-sender'], 'erin');
  await client.deactivate();
  await broker.stop();
});

test('users: stomp.js logs in with login and passcode; a wrong passcode gets the one refusal', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'stoa-node-users-'));
  stoaUsers(dir, ['add', 'frank', '--password-stdin'], 'open sesame');
  const broker = await startBroker(['--auth', 'users', '--auth-failure-delay-ms', '200'], { dataDir: dir });
  const good = makeClient(broker.url, { connectHeaders: { login: 'frank', passcode: 'open sesame' } });
  const frame = await connected(good);
  assert.equal(frame.headers['user-name'], 'frank');
  for (const connectHeaders of [{ login: 'frank', passcode: 'wrong' }, { login: 'nobody', passcode: 'open sesame' }, { login: 'frank' }]) {
    const bad = makeClient(broker.url, { connectHeaders });
    const started = Date.now();
    await assert.rejects(connected(bad), /ERROR: authentication failed/);
    assert.ok(Date.now() - started >= 200, 'the refusal waits --auth-failure-delay-ms');
    await bad.deactivate();
  }
  // The one who logged in is untouched.
  const { done } = collect(good, '/topic/t.users', 1, { receipt: 'in' });
  await withTimeout(new Promise((resolve) => good.watchForReceipt('in', resolve)), 'the subscription');
  await publishConfirmed(good, { destination: '/topic/t.users', body: 'still in' });
  assert.equal((await done)[0].body, 'still in');
  await good.deactivate();
  await broker.stop();
});
