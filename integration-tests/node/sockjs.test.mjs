// sockjs-client 1.6.1 with @stomp/stompjs 7 against the real stoa binary, over each
// transport sockjs-client offers in Node (websocket, xhr-streaming, xhr-polling), talking to
// plain WebSocket clients both ways.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { Client } from '@stomp/stompjs';
import SockJS from 'sockjs-client';
import {
  startBroker, makeClient, connected, publishConfirmed, subscribeConfirmed, withTimeout, Inbox, stopAll,
} from './broker.mjs';

after(stopAll);

const sockjsClients = new Set();
after(async () => {
  await Promise.all([...sockjsClients].map((client) => client.deactivate().catch(() => {})));
});

/** A stomp.js client over SockJS restricted to `transport`; `used` holds the transport
 * sockjs-client reports once open. */
function sockjsClient(broker, transport, options = {}) {
  const used = {};
  const client = new Client({
    webSocketFactory: () => {
      const sock = new SockJS(`http://${broker.http}/ws`, null, { transports: [transport] });
      sock.addEventListener('open', () => { used.transport = sock.transport; });
      return sock;
    },
    reconnectDelay: 0,
    heartbeatIncoming: 0,
    heartbeatOutgoing: 0,
    ...options,
  });
  sockjsClients.add(client);
  return { client, used };
}

/** Room chat messages (not join or leave notices) of a room subscription. */
function chatOnly(inbox) {
  return (message) => {
    if (!message.headers['x-event']) inbox.push(message);
  };
}

for (const transport of ['websocket', 'xhr-streaming', 'xhr-polling']) {
  test(`over SockJS ${transport}, room messages flow both ways with plain WebSocket clients`, async () => {
    const broker = await startBroker();
    const room = `/topic/room.sockjs-${transport}`;
    const { client: viaSockjs, used } = sockjsClient(broker, transport);
    const frame = await connected(viaSockjs);
    assert.equal(frame.headers.version, '1.2');
    assert.equal(used.transport, transport);
    const viaWs = makeClient(broker.url);
    await connected(viaWs);

    const sockjsInbox = new Inbox();
    const wsInbox = new Inbox();
    await subscribeConfirmed(viaSockjs, room, chatOnly(sockjsInbox));
    await subscribeConfirmed(viaWs, room, chatOnly(wsInbox));

    // Bodies that SockJS must escape on the way: quotes, newlines, NUL-free controls,
    // separators and non-ASCII.
    const bodies = ['plain', 'quote " and \\ backslash', 'line\nbreak', 'tab\tand \u2028 sep', 'héllo wörld ✓', '{"json":[1,2]}'];
    for (const body of bodies) {
      await publishConfirmed(viaSockjs, { destination: room, body, headers: { 'x-from': 'sockjs' } });
      await publishConfirmed(viaWs, { destination: room, body, headers: { 'x-from': 'ws' } });
    }
    const expected = bodies.flatMap((body) => [['sockjs', body], ['ws', body]]);
    const seen = (items) => items.map((m) => [m.headers['x-from'], m.body]);
    assert.deepEqual(seen(await sockjsInbox.until((items) => items.length >= expected.length, 'messages over SockJS')), expected);
    assert.deepEqual(seen(await wsInbox.until((items) => items.length >= expected.length, 'messages over WebSocket')), expected);
    // Each kept room message carries its number, the same for both members.
    assert.deepEqual(sockjsInbox.items.map((m) => m.headers['x-seq']), wsInbox.items.map((m) => m.headers['x-seq']));

    await viaSockjs.deactivate();
    await viaWs.deactivate();
    await broker.stop();
  });
}

test('over xhr-streaming, large messages and many small ones cross the streaming limit whole and in order', async () => {
  // 4 KiB per streaming response: every large message ends a response, and the small ones
  // end one every few dozen; sockjs-client opens the next each time.
  const broker = await startBroker(['--sockjs-stream-bytes', '4096']);
  const { client: reader, used } = sockjsClient(broker, 'xhr-streaming');
  await connected(reader);
  assert.equal(used.transport, 'xhr-streaming');
  const inbox = new Inbox();
  await subscribeConfirmed(reader, '/topic/t.stream', (m) => inbox.push(m));
  const writer = makeClient(broker.url);
  await connected(writer);

  const large = (n) => `${n}:`.padEnd(100 * 1024 + n, String.fromCharCode(97 + (n % 26)));
  const sent = [];
  for (let n = 0; n < 5; n += 1) sent.push(large(n));
  for (let n = 0; n < 300; n += 1) sent.push(`small ${n}`);
  for (const body of sent) {
    writer.publish({ destination: '/topic/t.stream', body });
  }
  await publishConfirmed(writer, { destination: '/topic/t.stream', body: 'last' });
  sent.push('last');
  const got = await inbox.until((items) => items.length >= sent.length, 'every message', 30_000);
  assert.equal(got.length, sent.length);
  got.forEach((m, i) => assert.equal(m.body, sent[i], `message ${i}`));

  // A large message from the SockJS side goes out through xhr_send.
  const echo = new Inbox();
  await subscribeConfirmed(writer, '/topic/t.upload', (m) => echo.push(m));
  await publishConfirmed(reader, { destination: '/topic/t.upload', body: large(7) });
  assert.equal((await echo.until((items) => items.length >= 1, 'the upload'))[0].body, large(7));

  await reader.deactivate();
  await writer.deactivate();
  await broker.stop();
});

test('STOMP heart-beats keep an idle xhr-polling session up, with SockJS heart-beat frames between', async () => {
  const broker = await startBroker(['--heart-beat', '200,200', '--sockjs-heartbeat-ms', '300']);
  let closes = 0;
  const { client, used } = sockjsClient(broker, 'xhr-polling', {
    heartbeatIncoming: 200,
    heartbeatOutgoing: 200,
    onWebSocketClose: () => { closes += 1; },
  });
  const frame = await connected(client);
  assert.equal(used.transport, 'xhr-polling');
  assert.equal(frame.headers['heart-beat'], '200,200');
  // Ten intervals with nothing but heart-beats: neither side gives up.
  await new Promise((resolve) => setTimeout(resolve, 2000));
  assert.equal(closes, 0, 'the idle session was dropped');
  const inbox = new Inbox();
  await subscribeConfirmed(client, '/topic/t.alive', (m) => inbox.push(m));
  const publisher = makeClient(broker.url);
  await connected(publisher);
  await publishConfirmed(publisher, { destination: '/topic/t.alive', body: 'still here' });
  assert.equal((await inbox.until((items) => items.length >= 1, 'the message'))[0].body, 'still here');
  await client.deactivate();
  await publisher.deactivate();
  await broker.stop();
});

test('DISCONNECT over SockJS closes the session with its receipt first', async () => {
  const broker = await startBroker();
  const { client } = sockjsClient(broker, 'xhr-streaming');
  await connected(client);
  const closed = new Promise((resolve) => {
    client.onWebSocketClose = (event) => resolve(event);
  });
  await client.deactivate();
  const event = await withTimeout(closed, 'the close');
  // stomp.js closes its side itself after the DISCONNECT receipt: a normal close.
  assert.ok([1000, 3000].includes(event.code), `close code ${event.code}`);
  await broker.stop();
});
