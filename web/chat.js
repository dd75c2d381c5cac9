// The Stoa chat page: stomp.js over WebSocket to /ws. Rooms are /topic/room.<name>;
// direct messages go to /user/<name>/queue/dm and arrive on /user/queue/dm.
// Everything a person typed is rendered with textContent, never as HTML.
// Sign-in follows the server's mode (GET /api/config): a nickname in `none`, name and
// password in `users`, a token from the link's `#token=` fragment in `jwt`.
'use strict';

(() => {
  const HISTORY_ON_JOIN = 50;
  const TYPING_SEND_EVERY_MS = 2000;
  const TYPING_SHOW_MS = 3500;
  const ROOM_LIST_REFRESH_MS = 5000;
  /** How long a WebSocket may take to reach CONNECTED before the page tries SockJS. */
  const WEBSOCKET_TIMEOUT_MS = 5000;
  const TRANSPORTS = ['websocket', 'sockjs', 'sse'];
  const ROOM_NAME = /^[\p{L}\p{N}_-]{1,64}$/u;
  /** Where the jwt-mode token is kept: this tab only, gone when it closes. */
  const TOKEN_KEY = 'stoa.token';
  /** ERROR messages that end the session: the person must sign in again. */
  const SIGN_IN_AGAIN = /^(authentication failed|too many failed logins|session revoked|token expired)/;

  const $ = (id) => document.getElementById(id);
  const el = (tag, props = {}, ...children) => {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (key === 'testid') node.dataset.testid = value;
      else if (key === 'dataset') Object.assign(node.dataset, value);
      else node[key] = value;
    }
    node.append(...children);
    return node;
  };

  const state = {
    /** The server's sign-in mode: 'none' | 'users' | 'jwt'. */
    auth: 'none',
    name: '',
    /** In `users` mode, kept in memory only, for reconnects and the HTTP API. */
    password: '',
    /** A room to open once connected (the /?room= link). */
    pendingRoom: '',
    client: null,
    /** The open conversation: { kind: 'room' | 'dm', name }. */
    active: null,
    /** Joined rooms: name -> { lastSeq, items, unread, members, subscription }. */
    rooms: new Map(),
    /** Room list from the server: name -> member count. */
    directory: new Map(),
    /** Direct conversations: user -> { items, unread }. */
    dms: new Map(),
    /** Who is typing in each room: room -> Map(user -> timer). */
    typing: new Map(),
    lastTypingSent: 0,
  };

  // ---- connection ----

  function setStatus(text) {
    const status = $('status');
    status.textContent = text;
    status.dataset.state = text;
  }

  function wsUrl() {
    const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
    return `${scheme}://${location.host}/ws`;
  }

  /** The CONNECT headers for the server's mode; read again before every (re)connect. */
  function credentials() {
    if (state.auth === 'users') return { login: state.name, passcode: state.password };
    if (state.auth === 'jwt') return { passcode: sessionStorage.getItem(TOKEN_KEY) || '' };
    return { login: state.name };
  }

  /** The HTTP API's `Authorization` header for the server's mode. */
  function authorization() {
    if (state.auth === 'users') {
      const bytes = new TextEncoder().encode(`${state.name}:${state.password}`);
      return { Authorization: `Basic ${btoa(String.fromCharCode(...bytes))}` };
    }
    if (state.auth === 'jwt') return { Authorization: `Bearer ${sessionStorage.getItem(TOKEN_KEY) || ''}` };
    return {};
  }

  function sockjsUrl() {
    return `${location.protocol}//${location.host}/ws`;
  }

  /** Says which transport carries the session (hook `transport`). */
  function setTransport(text) {
    const node = $('transport');
    node.textContent = text;
    node.dataset.transport = text;
  }

  /** What identifies an EventSource reader, which cannot send headers. */
  function readerQuery() {
    if (state.auth === 'jwt') return { access_token: sessionStorage.getItem(TOKEN_KEY) || '' };
    return { name: state.name };
  }

  /** A STOMP client over WebSocket that falls back to SockJS by itself when the WebSocket
   * does not open within 5 s or closes before CONNECTED; or the transport `?transport=`
   * forces (`websocket`, `sockjs`, or `sse`: rooms through EventSource and POST). */
  function makeClient(onConnect, onClose) {
    const forced = new URLSearchParams(location.search).get('transport');
    const mayFallBack = !TRANSPORTS.includes(forced);
    let transport = mayFallBack ? 'websocket' : forced;
    if (transport === 'sse') {
      setTransport('sse');
      const client = new StoaTransport.SseClient({ query: readerQuery, headers: authorization });
      client.onConnect = onConnect;
      client.onWebSocketClose = onClose;
      return client;
    }
    let connectedOnce = false;
    const client = new StompJs.Client({
      webSocketFactory: () => {
        if (transport === 'websocket') {
          setTransport('websocket');
          return new WebSocket(wsUrl(), ['v12.stomp', 'v11.stomp', 'v10.stomp']);
        }
        setTransport('sockjs');
        return StoaTransport.sockjs(sockjsUrl(), (name) => setTransport(`sockjs ${name}`));
      },
      connectionTimeout: mayFallBack ? WEBSOCKET_TIMEOUT_MS : 0,
      reconnectDelay: 1000,
      heartbeatIncoming: 10000,
      heartbeatOutgoing: 10000,
    });
    client.onConnect = (frame) => {
      connectedOnce = true;
      onConnect(frame);
    };
    client.onWebSocketClose = () => {
      if (!connectedOnce && transport === 'websocket' && mayFallBack) {
        // Something between here and the broker breaks WebSocket: the next try is SockJS.
        transport = 'sockjs';
        client.connectionTimeout = 0;
      }
      onClose();
    };
    return client;
  }

  function connect(name) {
    state.name = name;
    $('me').textContent = name;
    if (state.auth === 'users' && new URLSearchParams(location.search).get('transport') === 'sse') {
      // EventSource cannot send a password; the STOMP transports can.
      $('login-error').textContent = 'transport=sse needs sign-in by nickname or token';
      return;
    }
    const onConnect = (frame) => {
      // The name the server proved (a token's subject, or the login as the server spells it).
      if (frame.headers['user-name']) state.name = frame.headers['user-name'];
      $('me').textContent = state.name;
      setStatus('connected');
      $('login').hidden = true;
      $('app').hidden = false;
      client.subscribe('/user/queue/dm', onDirectMessage);
      // After a reconnect, each room resumes after the last message seen: nothing missed.
      for (const room of state.rooms.keys()) subscribeRoom(room);
      refreshRooms();
      render();
      if (state.pendingRoom) {
        const room = state.pendingRoom;
        state.pendingRoom = '';
        joinRoom(room);
      }
    };
    const client = makeClient(onConnect, () => setStatus(client.active ? 'reconnecting' : 'disconnected'));
    client.connectHeaders = credentials();
    client.beforeConnect = () => {
      client.connectHeaders = credentials();
    };
    client.onStompError = (frame) => {
      const message = frame.headers.message || 'the server refused the connection';
      if (!client.connected || SIGN_IN_AGAIN.test(message)) {
        signedOut(message);
        return;
      }
      const denied = /^access denied: \/topic\/room\.(.+)$/.exec(message);
      const room = denied && state.rooms.get(denied[1]);
      if (room && !room.confirmed) {
        // The server refused the subscription (and closes the connection, as STOMP asks):
        // forget the room, or every reconnect would ask again and be refused again.
        state.rooms.delete(denied[1]);
        if (isActive('room', denied[1])) state.active = null;
        $('room-error').textContent = `You may not enter ${denied[1]}.`;
        render();
      } else if (room) {
        $('room-error').textContent = `You may not write in ${denied[1]}.`;
      } else {
        $('room-error').textContent = message;
      }
    };
    state.client = client;
    setStatus('reconnecting');
    client.activate();
  }

  /** The server ended or refused the session: back to the sign-in form, with its reason. */
  function signedOut(message) {
    state.client.deactivate();
    setStatus('disconnected');
    let reason = message;
    if (state.auth === 'jwt') {
      // The broker gives one refusal text for every bad login; the page can tell a person
      // more than that about its own token, which it can read.
      const claims = tokenClaims(sessionStorage.getItem(TOKEN_KEY) || '');
      if (message.startsWith('token expired') || (typeof claims.exp === 'number' && claims.exp * 1000 <= Date.now())) {
        reason = 'token expired';
      }
      sessionStorage.removeItem(TOKEN_KEY);
    }
    state.password = '';
    $('password').value = '';
    $('login').hidden = false;
    $('app').hidden = true;
    $('login-error').textContent = reason;
  }

  /** Takes `#token=...` out of the address bar into this tab's sessionStorage. */
  function takeTokenFromFragment() {
    const fragment = new URLSearchParams(location.hash.slice(1));
    const token = fragment.get('token');
    if (token) {
      sessionStorage.setItem(TOKEN_KEY, token);
      fragment.delete('token');
      const rest = fragment.toString();
      history.replaceState(null, '', `${location.pathname}${location.search}${rest ? `#${rest}` : ''}`);
    }
    return sessionStorage.getItem(TOKEN_KEY) || '';
  }

  /** A JWT's claims, read without checking (the server checks): {} if it is not one. */
  function tokenClaims(token) {
    try {
      const part = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
      const binary = atob(part.padEnd(Math.ceil(part.length / 4) * 4, '='));
      return JSON.parse(new TextDecoder().decode(Uint8Array.from(binary, (c) => c.charCodeAt(0))));
    } catch {
      return {};
    }
  }

  // ---- rooms ----

  function subscribeRoom(name) {
    const room = state.rooms.get(name);
    const headers = room.lastSeq > 0 ? { 'x-since': String(room.lastSeq) } : { 'x-history': String(HISTORY_ON_JOIN) };
    // The receipt tells a refused subscription (ERROR, no receipt) from a refused SEND.
    const receipt = `join-${name}-${Date.now()}`;
    state.client.watchForReceipt(receipt, () => {
      room.confirmed = true;
    });
    headers.receipt = receipt;
    room.subscription = state.client.subscribe(`/topic/room.${name}`, (m) => onRoomMessage(name, m), headers);
  }

  function joinRoom(name) {
    if (!ROOM_NAME.test(name)) {
      $('room-error').textContent = 'A room name has 1 to 64 letters, digits, _ or -.';
      return;
    }
    $('room-error').textContent = '';
    if (!state.rooms.has(name)) {
      state.rooms.set(name, { lastSeq: 0, items: [], unread: 0, members: [], subscription: null, confirmed: false });
      if (state.client.connected) subscribeRoom(name);
    }
    open({ kind: 'room', name });
    refreshMembers(name);
  }

  function leaveRoom(name) {
    const room = state.rooms.get(name);
    if (!room) return;
    if (room.subscription && state.client.connected) room.subscription.unsubscribe();
    state.rooms.delete(name);
    const next = state.rooms.keys().next();
    state.active = next.done ? null : { kind: 'room', name: next.value };
    refreshRooms();
    render();
  }

  function onRoomMessage(name, message) {
    const room = state.rooms.get(name);
    if (!room) return;
    const h = message.headers;
    if (h['x-transient'] === 'true') {
      if (h['x-typing'] === 'true' && h['x-sender'] !== state.name) showTyping(name, h['x-sender']);
      return;
    }
    if (h['x-event'] === 'gap') {
      const first = Number(h['x-first-seq']);
      // The room numbers from below what we saw: it was forgotten (nothing kept, nobody in
      // it) or lost its last messages. Our numbers mean nothing now: what follows is new.
      if (first && first <= room.lastSeq) room.lastSeq = first - 1;
      room.items.push({ notice: `Older messages are no longer kept (from #${h['x-first-seq']} on).` });
      renderIfActive('room', name);
      return;
    }
    const seq = Number(h['x-seq']);
    if (seq) {
      if (seq <= room.lastSeq) return; // already shown: replay overlapping what we had
      room.lastSeq = seq;
    }
    const sender = h['x-sender'] || '';
    if (h['x-event'] === 'join' || h['x-event'] === 'leave') {
      room.items.push({ notice: `${sender} ${h['x-event'] === 'join' ? 'joined' : 'left'}`, event: h['x-event'], user: sender });
      // Replayed notices are history: who is here now is asked once the replay is over.
      if (h['x-replay'] !== 'true') {
        refreshMembers(name);
        refreshRooms();
      }
    } else {
      room.items.push({ sender, body: message.body, time: Number(h['x-timestamp']) });
      stopTyping(name, sender);
      if (!isActive('room', name) && h['x-replay'] !== 'true') room.unread += 1;
    }
    renderIfActive('room', name);
    scheduleLists();
  }

  async function fetchJson(path) {
    const response = await fetch(path, { cache: 'no-store', headers: authorization() });
    if (!response.ok) return null;
    return response.json();
  }

  async function refreshRooms() {
    const list = await fetchJson('/api/rooms').catch(() => null);
    if (!list) return;
    state.directory = new Map(list.rooms.map((r) => [r.room, r.members]));
    renderLists();
  }

  async function refreshMembers(name) {
    const detail = await fetchJson(`/api/rooms/${encodeURIComponent(name)}`).catch(() => null);
    const room = state.rooms.get(name);
    if (!room || !detail) return;
    room.members = detail.members;
    state.directory.set(name, detail.members.length);
    renderLists();
  }

  // ---- direct messages ----

  function dm(user) {
    if (!state.dms.has(user)) state.dms.set(user, { items: [], unread: 0 });
    return state.dms.get(user);
  }

  function onDirectMessage(message) {
    const sender = message.headers['x-sender'] || '';
    const conversation = dm(sender);
    conversation.items.push({ sender, body: message.body, time: Number(message.headers['x-timestamp']) });
    if (!isActive('dm', sender)) conversation.unread += 1;
    renderIfActive('dm', sender);
    scheduleLists();
  }

  // ---- typing ----

  function showTyping(room, user) {
    if (!state.typing.has(room)) state.typing.set(room, new Map());
    const typers = state.typing.get(room);
    clearTimeout(typers.get(user));
    typers.set(user, setTimeout(() => stopTyping(room, user), TYPING_SHOW_MS));
    renderTyping();
  }

  function stopTyping(room, user) {
    const typers = state.typing.get(room);
    if (!typers || !typers.has(user)) return;
    clearTimeout(typers.get(user));
    typers.delete(user);
    renderTyping();
  }

  function sendTyping() {
    const active = state.active;
    if (!active || active.kind !== 'room' || !state.client.connected) return;
    const now = Date.now();
    if (now - state.lastTypingSent < TYPING_SEND_EVERY_MS) return;
    state.lastTypingSent = now;
    state.client.publish({
      destination: `/topic/room.${active.name}`,
      body: '',
      headers: { 'x-transient': 'true', 'x-typing': 'true' },
    });
  }

  // ---- sending ----

  function send() {
    const input = $('input');
    const text = input.value;
    const active = state.active;
    if (!text.trim() || !active || !state.client.connected) return;
    const headers = { 'content-type': 'text/plain;charset=utf-8' };
    if (active.kind === 'room') {
      state.client.publish({ destination: `/topic/room.${active.name}`, body: text, headers });
    } else {
      state.client.publish({ destination: `/user/${active.name}/queue/dm`, body: text, headers });
      // The broker does not echo a direct message to its sender: show it here.
      dm(active.name).items.push({ sender: state.name, body: text, time: Date.now() });
      render();
    }
    input.value = '';
    state.lastTypingSent = 0;
  }

  // ---- rendering ----

  function isActive(kind, name) {
    return state.active !== null && state.active.kind === kind && state.active.name === name;
  }

  function open(conversation) {
    state.active = conversation;
    const target = conversation.kind === 'room' ? state.rooms.get(conversation.name) : dm(conversation.name);
    if (target) target.unread = 0;
    $('sidebar').classList.remove('open');
    render();
    $('input').focus();
  }

  // Messages come one WebSocket message at a time, thousands of them in a replay: the page
  // draws at most once per RENDER_EVERY_MS, and only what is new.
  const RENDER_EVERY_MS = 16;
  const scheduled = { messages: false, lists: false, timer: null };
  /** What the message list shows: whose conversation, and how many of its items. */
  const shown = { items: null, count: 0 };

  function schedule() {
    if (scheduled.timer !== null) return;
    scheduled.timer = setTimeout(() => {
      scheduled.timer = null;
      if (scheduled.lists) renderLists();
      if (scheduled.messages) renderMessages();
      scheduled.lists = false;
      scheduled.messages = false;
    }, RENDER_EVERY_MS);
  }

  function scheduleLists() {
    scheduled.lists = true;
    schedule();
  }

  function renderIfActive(kind, name) {
    if (!isActive(kind, name)) return;
    scheduled.messages = true;
    schedule();
  }

  function render() {
    renderLists();
    renderMessages();
    renderTyping();
  }

  function renderMessages() {
    const list = $('messages');
    const active = state.active;
    const items = !active ? [] : active.kind === 'room' ? (state.rooms.get(active.name)?.items ?? []) : dm(active.name).items;
    $('title').textContent = !active ? 'Stoa' : active.kind === 'room' ? `# ${active.name}` : `@ ${active.name}`;
    $('empty').hidden = active !== null;
    $('leave-button').hidden = !active || active.kind !== 'room';
    $('input').disabled = !active;
    $('composer').querySelector('button').disabled = !active;
    const nearBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 80;
    // Items are only ever appended: the same conversation needs only its new ones drawn.
    if (shown.items === items && shown.count <= items.length) {
      list.append(...items.slice(shown.count).map(renderItem));
    } else {
      list.replaceChildren(...items.map(renderItem));
    }
    shown.items = items;
    shown.count = items.length;
    if (nearBottom) list.scrollTop = list.scrollHeight;
  }

  function renderItem(item) {
    if (item.notice !== undefined) {
      return el('li', { className: 'notice', testid: 'notice', dataset: { event: item.event || 'info' } }, item.notice);
    }
    const time = new Date(item.time || Date.now());
    return el(
      'li',
      { className: item.sender === state.name ? 'message mine' : 'message', testid: 'message' },
      el(
        'div',
        { className: 'meta' },
        el('span', { className: 'sender', testid: 'message-sender' }, item.sender),
        el('time', { testid: 'message-time', dateTime: time.toISOString() }, time.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' })),
      ),
      el('div', { className: 'body', testid: 'message-body' }, item.body),
    );
  }

  function renderLists() {
    const names = new Set([...state.directory.keys(), ...state.rooms.keys()]);
    const rooms = [...names].sort().map((name) => {
      const joined = state.rooms.get(name);
      const li = el(
        'li',
        { testid: 'room-item', dataset: { room: name }, className: isActive('room', name) ? 'active' : '' },
        el('span', { className: 'name' }, `# ${name}`),
        el('span', { className: 'count', title: 'members' }, String(state.directory.get(name) ?? 0)),
        el('span', { className: 'unread', testid: 'unread-count' }, joined && joined.unread ? String(joined.unread) : ''),
      );
      li.addEventListener('click', () => joinRoom(name));
      return li;
    });
    $('rooms').replaceChildren(...rooms);

    const dms = [...state.dms.entries()].map(([user, conversation]) => {
      const li = el(
        'li',
        { testid: 'dm-item', dataset: { user }, className: isActive('dm', user) ? 'active' : '' },
        el('span', { className: 'name' }, `@ ${user}`),
        el('span', { className: 'unread' }, conversation.unread ? String(conversation.unread) : ''),
      );
      li.addEventListener('click', () => open({ kind: 'dm', name: user }));
      return li;
    });
    $('dms').replaceChildren(...dms);

    const active = state.active;
    const members = active && active.kind === 'room' ? (state.rooms.get(active.name)?.members ?? []) : [];
    $('members').replaceChildren(...members.map((user) => {
      const self = user === state.name;
      const li = el('li', { testid: 'member', className: self ? 'self' : '', title: self ? 'you' : `message ${user}` }, user);
      if (!self) li.addEventListener('click', () => open({ kind: 'dm', name: user }));
      return li;
    }));
  }

  function renderTyping() {
    const active = state.active;
    const typers = active && active.kind === 'room' ? [...(state.typing.get(active.name)?.keys() ?? [])] : [];
    const text = typers.length === 0 ? '' : typers.length === 1 ? `${typers[0]} is typing…` : `${typers.join(', ')} are typing…`;
    $('typing').textContent = text;
  }

  // ---- wiring ----

  $('login-form').addEventListener('submit', (e) => {
    e.preventDefault();
    $('login-error').textContent = '';
    if (state.auth === 'jwt') {
      if (!takeTokenFromFragment()) {
        $('login-error').textContent = 'No token: open the link your sign-in service gave you.';
        return;
      }
      connect('');
      return;
    }
    const name = $('nickname').value.trim();
    if (!name) return;
    if (state.auth === 'users') {
      state.password = $('password').value;
      if (!state.password) return;
    }
    connect(name);
  });

  $('new-room-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const name = $('new-room').value.trim();
    if (!state.client || !name) return;
    joinRoom(name);
    $('new-room').value = '';
  });

  $('composer').addEventListener('submit', (e) => {
    e.preventDefault();
    send();
  });

  $('input').addEventListener('keydown', (e) => {
    // Enter sends; Shift+Enter is a new line; Enter that confirms an input method's
    // composition (Korean, Japanese) must not send half a word.
    if (e.key !== 'Enter' || e.shiftKey || e.isComposing || e.keyCode === 229) return;
    e.preventDefault();
    send();
  });
  $('input').addEventListener('input', sendTyping);
  $('leave-button').addEventListener('click', () => state.active && leaveRoom(state.active.name));
  $('menu-button').addEventListener('click', () => $('sidebar').classList.toggle('open'));
  // On a phone the member list is a drawer too.
  $('members-button').addEventListener('click', () => $('people').classList.toggle('open'));
  setInterval(() => state.client && state.client.connected && refreshRooms(), ROOM_LIST_REFRESH_MS);

  /** Shows the sign-in form the server's mode asks for. */
  function showSignIn() {
    const password = $('password');
    $('password-field').hidden = state.auth !== 'users';
    password.required = state.auth === 'users';
    $('nickname').required = state.auth !== 'jwt';
    const label = document.querySelector('label[for=nickname]');
    label.hidden = state.auth === 'jwt';
    label.textContent = state.auth === 'users' ? 'Name' : 'Nickname';
    $('nickname').hidden = state.auth === 'jwt';
    $('token-help').hidden = state.auth !== 'jwt';
  }

  async function start() {
    const config = await fetchJson('/api/config').catch(() => null);
    state.auth = config && ['none', 'users', 'jwt'].includes(config.auth) ? config.auth : 'none';
    showSignIn();
    // /?room=<room>&name=<nick> joins directly; with accounts, the name is only filled in.
    const params = new URLSearchParams(location.search);
    state.pendingRoom = params.get('room') || '';
    if (state.auth === 'jwt') {
      if (takeTokenFromFragment()) connect('');
      return;
    }
    if (!params.get('name')) return;
    $('nickname').value = params.get('name');
    if (state.auth === 'users') {
      $('password').focus();
      return;
    }
    connect(params.get('name'));
  }

  start();
})();
