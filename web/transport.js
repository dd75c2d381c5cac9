// How the chat page reaches the broker when WebSocket cannot: SockJS under /ws (the same
// STOMP, over HTTP streaming or polling), or rooms over Server-Sent Events with sending by
// POST (/api/rooms/<room>/events and /messages).
//
// SseClient answers the part of stomp.js's Client the page uses (activate, subscribe,
// publish, watchForReceipt, deactivate), for room destinations only: direct messages need
// STOMP.
'use strict';

window.StoaTransport = (() => {
  /** Room events as the HTTP API names them, each handed on as a STOMP-like message. */
  const EVENTS = ['message', 'join', 'leave', 'transient', 'gap'];
  const ROOM = /^\/topic\/room\.(.+)$/;

  /** A room message from its JSON shape, as the page reads STOMP messages. */
  function asMessage(kind, data) {
    if (kind === 'gap') {
      return { headers: { 'x-event': 'gap', 'x-first-seq': String(data.first_seq) }, body: '' };
    }
    const headers = { ...(data.headers || {}) };
    if (data.seq != null) headers['x-seq'] = String(data.seq);
    if (data.sender != null) headers['x-sender'] = data.sender;
    if (data.timestamp != null) headers['x-timestamp'] = String(data.timestamp);
    if (data.message_id != null) headers['message-id'] = data.message_id;
    if (data.content_type != null) headers['content-type'] = data.content_type;
    if (kind === 'join' || kind === 'leave') headers['x-event'] = kind;
    if (kind === 'transient') headers['x-transient'] = 'true';
    const body = data.body != null ? data.body : atob(data.body_base64 || '');
    return { headers, body };
  }

  class SseClient {
    /** `query()` gives what identifies the reader (`name=`, `access_token=`); `headers()`
     * the POSTs' headers (Authorization). */
    constructor({ query, headers }) {
      this.query = query;
      this.headers = headers;
      this.connected = false;
      this.active = false;
      this.sources = new Set();
      this.receipts = new Map();
      this.onConnect = () => {};
      this.onStompError = () => {};
      this.onWebSocketClose = () => {};
      this.beforeConnect = () => {};
    }

    activate() {
      this.active = true;
      this.connected = true;
      // Asynchronous, as a STOMP CONNECTED would be.
      setTimeout(() => this.onConnect({ headers: {} }), 0);
    }

    deactivate() {
      this.active = false;
      this.connected = false;
      for (const source of this.sources) source.close();
      this.sources.clear();
      this.onWebSocketClose();
      return Promise.resolve();
    }

    watchForReceipt(id, callback) {
      this.receipts.set(id, callback);
    }

    subscribe(destination, callback, headers = {}) {
      const room = ROOM.exec(destination);
      if (!room) return { unsubscribe() {} };
      const params = new URLSearchParams(this.query());
      if (headers['x-since']) params.set('since', headers['x-since']);
      else if (headers['x-history']) params.set('limit', headers['x-history']);
      // EventSource sends Last-Event-ID itself when it reconnects: nothing is missed.
      const source = new EventSource(`/api/rooms/${encodeURIComponent(room[1])}/events?${params}`);
      for (const kind of EVENTS) {
        source.addEventListener(kind, (event) => callback(asMessage(kind, JSON.parse(event.data))));
      }
      const receipt = headers.receipt;
      source.addEventListener('open', () => {
        const done = receipt && this.receipts.get(receipt);
        if (done) {
          this.receipts.delete(receipt);
          done({ headers: { 'receipt-id': receipt } });
        }
      });
      this.sources.add(source);
      return {
        unsubscribe: () => {
          source.close();
          this.sources.delete(source);
        },
      };
    }

    publish({ destination, body, headers = {} }) {
      const room = ROOM.exec(destination);
      if (!room) {
        this.onStompError({ headers: { message: 'direct messages need WebSocket or SockJS' } });
        return;
      }
      const params = new URLSearchParams(this.query());
      fetch(`/api/rooms/${encodeURIComponent(room[1])}/messages?${params}`, {
        method: 'POST',
        headers: { 'Content-Type': 'application/json', ...this.headers() },
        body: JSON.stringify({ body, headers }),
      }).then(async (response) => {
        if (!response.ok) {
          const answer = await response.json().catch(() => ({}));
          this.onStompError({ headers: { message: answer.error || `sending failed (${response.status})` } });
        }
      }).catch((error) => this.onStompError({ headers: { message: String(error) } }));
    }
  }

  /** SockJS to `/ws` over its HTTP transports, xhr-streaming first (WebSocket is what
   * failed). */
  function sockjs(url, onTransport) {
    const sock = new SockJS(url, null, {
      transports: ['xhr-streaming', 'eventsource', 'iframe-eventsource', 'htmlfile', 'iframe-htmlfile', 'xhr-polling', 'iframe-xhr-polling'],
    });
    sock.addEventListener('open', () => onTransport(sock.transport));
    return sock;
  }

  return { SseClient, sockjs };
})();
