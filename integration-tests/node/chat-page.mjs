// What the chat page's browser tests share: Debian's Chromium driven by playwright-core
// (never a downloaded browser), and the hooks read the same way by every test.
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { after, before } from 'node:test';
import { chromium } from 'playwright-core';
import { stopAll } from './broker.mjs';

const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
export const screenshots = join(root, 'target', 'screenshots');

/** Headless Chromium with the flags this machine's closed network needs. */
export function launchChromium() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
    args: [
      '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
    ],
  });
}

/** One Chromium for a test file's tests: `.browser` once they run; closed after them, with
 * every broker and client the file started. Call at the top of the file. */
export function withChromium() {
  const shared = { browser: null };
  before(async () => {
    shared.browser = await launchChromium();
  });
  after(async () => {
    await shared.browser?.close();
    await stopAll();
  });
  return shared;
}

export async function say(page, text) {
  await page.getByTestId('message-input').fill(text);
  await page.getByTestId('message-input').press('Enter');
}

/** Waits until a message with exactly this body (and sender, if given) is on the page. */
export async function seeMessage(page, body, sender) {
  await page.waitForFunction(([b, s]) => [...document.querySelectorAll('[data-testid=message]')].some((m) =>
    m.querySelector('[data-testid=message-body]').textContent === b
      && (!s || m.querySelector('[data-testid=message-sender]').textContent === s)), [body, sender]);
}

export async function seeNotice(page, text) {
  await page.waitForFunction((t) => [...document.querySelectorAll('[data-testid=notice]')].some((n) => n.textContent === t), text);
}
