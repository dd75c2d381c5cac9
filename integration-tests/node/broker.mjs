// Starts the real stoa binary on free loopback ports, and stomp.js clients against it.
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { mkdtempSync, rmSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createInterface } from 'node:readline';
import { Client } from '@stomp/stompjs';
import WebSocket from 'ws';

const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
export const WAIT_MS = 10_000;

/** Everything started here and not stopped yet: a failed test must not leave a broker or a
 * reconnecting client behind (either keeps the test process, and CI, waiting for ever). */
const live = { brokers: new Set(), clients: new Set() };

/** Stops every broker and client still running; each test file calls it after its tests. */
export async function stopAll() {
  await Promise.all([...live.clients].map((client) => client.deactivate().catch(() => {})));
  await Promise.all([...live.brokers].map((broker) => broker.stop().catch(() => {})));
}

export function stoaBin() {
  const bin = process.env.STOA_BIN ?? join(root, 'target', 'debug', 'stoa');
  if (!existsSync(bin)) throw new Error(`${bin} is missing: run cargo build -p broker first`);
  return bin;
}

/** Starts stoa; resolves once it prints its listening line. */
export async function startBroker(args = [], { dataDir, http = '127.0.0.1:0', stomp = '127.0.0.1:0' } = {}) {
  const dir = dataDir ?? mkdtempSync(join(tmpdir(), 'stoa-node-'));
  const proc = spawn(stoaBin(), ['--http-listen', http, '--stomp-listen', stomp, '--data-dir', dir, ...args], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const line = await new Promise((resolve, reject) => {
    const rl = createInterface({ input: proc.stdout });
    rl.once('line', resolve);
    proc.once('exit', (code) => reject(new Error(`stoa exited with ${code} before listening`)));
  });
  const fields = Object.fromEntries(line.split(' ').slice(1).map((w) => w.split('=')));
  const exited = new Promise((resolve) => proc.once('exit', resolve));
  const broker = {
    http: fields.http,
    stomp: fields.stomp,
    url: `ws://${fields.http}/ws`,
    dataDir: dir,
    /** Stops it: SIGKILL by default, or `signal` (SIGTERM: a graceful stop). */
    async stop({ keepData = false, signal = 'SIGKILL' } = {}) {
      live.brokers.delete(broker);
      proc.kill(signal);
      await exited;
      if (!keepData) rmSync(dir, { recursive: true, force: true });
    },
  };
  live.brokers.add(broker);
  return broker;
}

/** `stoa users <args>` on `dataDir`, the password (if any) on standard input. */
export function stoaUsers(dataDir, args, password) {
  const run = spawnSync(stoaBin(), ['users', '--data-dir', dataDir, ...args], {
    input: password === undefined ? '' : `${password}\n`,
    encoding: 'utf8',
  });
  assert.equal(run.status, 0, `stoa users ${args.join(' ')}: ${run.stderr}`);
}

/** An HS256 token for `sub` whose `exp` is `expiresIn` seconds from now (negative: past). */
export function hs256(secret, sub, expiresIn) {
  const b64 = (value) => Buffer.from(JSON.stringify(value)).toString('base64url');
  const head = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64({ sub, exp: Math.floor(Date.now() / 1000) + expiresIn })}`;
  return `${head}.${createHmac('sha256', secret).update(head).digest('base64url')}`;
}

/** A stomp.js client over `ws`, offering the STOMP subprotocols as browsers do. */
export function makeClient(url, options = {}) {
  const client = new Client({
    webSocketFactory: () => new WebSocket(url, ['v12.stomp', 'v11.stomp', 'v10.stomp']),
    reconnectDelay: 0,
    heartbeatIncoming: 0,
    heartbeatOutgoing: 0,
    ...options,
  });
  live.clients.add(client);
  return client;
}

/** Activates `client` and resolves with its first CONNECTED frame. */
export function connected(client) {
  return withTimeout(
    new Promise((resolve, reject) => {
      const previous = client.onConnect;
      client.onConnect = (frame) => {
        client.onConnect = previous;
        previous?.(frame);
        resolve(frame);
      };
      client.onStompError = (frame) => reject(new Error(`ERROR: ${frame.headers.message}`));
      client.activate();
    }),
    'CONNECTED',
  );
}

/** Resolves with the next `count` messages on `destination`. */
export function collect(client, destination, count, headers = {}) {
  const got = [];
  let subscription;
  const done = new Promise((resolve) => {
    subscription = client.subscribe(destination, (message) => {
      got.push(message);
      if (got.length === count) resolve(got);
    }, headers);
  });
  return { subscription, done: withTimeout(done, `${count} messages on ${destination}`) };
}

/** Publishes with a receipt and resolves when the broker confirms it. */
export function publishConfirmed(client, params) {
  const receipt = `r-${Math.random().toString(36).slice(2)}`;
  const confirmed = new Promise((resolve) => client.watchForReceipt(receipt, resolve));
  client.publish({ ...params, headers: { ...(params.headers ?? {}), receipt } });
  return withTimeout(confirmed, `receipt ${receipt}`);
}

/** Subscribes with a receipt, so the subscription is live when this resolves. */
export async function subscribeConfirmed(client, destination, callback, headers = {}) {
  const receipt = `s-${Math.random().toString(36).slice(2)}`;
  const confirmed = new Promise((resolve) => client.watchForReceipt(receipt, resolve));
  const sub = client.subscribe(destination, callback, { ...headers, receipt });
  await withTimeout(confirmed, `subscription receipt ${receipt}`);
  return sub;
}

export function withTimeout(promise, what, ms = WAIT_MS) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** Collects what callbacks deliver and resolves waits the moment a condition holds. */
export class Inbox {
  constructor() {
    this.items = [];
    this.waiters = [];
  }

  push(item) {
    this.items.push(item);
    this.waiters = this.waiters.filter((check) => !check());
  }

  /** Resolves with the items once `predicate(items)` is true. */
  until(predicate, what) {
    return withTimeout(new Promise((resolve) => {
      const check = () => {
        if (!predicate(this.items)) return false;
        resolve(this.items);
        return true;
      };
      if (!check()) this.waiters.push(check);
    }), what);
  }
}
