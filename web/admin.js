// Stoa's operator dashboard: reads /admin/api/overview once a second, draws the last minutes
// with uPlot (vendored), fills the tables, and asks before each action.
'use strict';

(() => {
  const POLL_MS = 1000;
  // In --auth jwt the page is opened with ?access_token=…; the API gets it as a Bearer token.
  // In --auth users the browser sends the Basic credentials it asked for when the page opened.
  const token = new URLSearchParams(location.search).get('access_token');
  const headers = token ? { Authorization: `Bearer ${token}` } : {};

  const $ = (id) => document.getElementById(id);
  const fmt = (n, digits = 0) => (n == null ? '–' : Number(n).toLocaleString('en', { maximumFractionDigits: digits }));
  const ms = (n) => (n == null ? '–' : `${n < 10 ? n.toFixed(2) : n.toFixed(0)} ms`);

  const charts = {};
  function chart(id, series, data) {
    const el = $(id);
    const opts = {
      width: Math.max(300, el.clientWidth),
      height: 200,
      series: [{}, ...series],
      axes: [{}, { size: 60 }],
      scales: { x: { time: true } },
      legend: { live: false },
    };
    charts[id] = new uPlot(opts, data, el);
  }

  function draw(series) {
    const t = series.map((s) => s.t / 1000);
    const data = {
      'chart-connections': [t, series.map((s) => s.connections)],
      'chart-rate': [t, series.map((s) => s.messages_in), series.map((s) => s.messages_out)],
      'chart-latency': [t, series.map((s) => s.p50_ms), series.map((s) => s.p99_ms)],
      'chart-trouble': [t, series.map((s) => s.slow_consumers), series.map((s) => s.errors)],
    };
    if (!charts['chart-connections']) {
      chart('chart-connections', [{ label: 'open', stroke: '#2f6fed', width: 2 }], data['chart-connections']);
      chart('chart-rate', [
        { label: 'in', stroke: '#2f6fed', width: 2 },
        { label: 'out', stroke: '#2e7d32', width: 2 },
      ], data['chart-rate']);
      chart('chart-latency', [
        { label: 'p50', stroke: '#2e7d32', width: 2, spanGaps: false },
        { label: 'p99', stroke: '#b26a00', width: 2, spanGaps: false },
      ], data['chart-latency']);
      chart('chart-trouble', [
        { label: 'slow consumers', stroke: '#b26a00', width: 2 },
        { label: 'errors', stroke: '#c62828', width: 2 },
      ], data['chart-trouble']);
      for (const id of Object.keys(data)) $(id).setAttribute('data-samples', String(series.length));
      return;
    }
    for (const [id, d] of Object.entries(data)) charts[id].setData(d);
    // For tests and scripts: how many samples each chart holds.
    for (const id of Object.keys(data)) $(id).setAttribute('data-samples', String(series.length));
  }

  window.addEventListener('resize', () => {
    for (const [id, c] of Object.entries(charts)) c.setSize({ width: Math.max(300, $(id).clientWidth), height: 200 });
  });

  function cell(row, text, cls) {
    const td = row.insertCell();
    td.textContent = text;
    if (cls) td.className = cls;
    return td;
  }

  function actionButton(row, label, testid, question, run) {
    const td = row.insertCell();
    const button = document.createElement('button');
    button.type = 'button';
    button.textContent = label;
    button.setAttribute('data-testid', testid);
    button.addEventListener('click', () => confirmThen(question, run));
    td.append(button);
    return button;
  }

  function fill(tbodyId, rows, render) {
    const tbody = $(tbodyId);
    const fresh = document.createElement('tbody');
    fresh.id = tbodyId;
    for (const r of rows) render(fresh.insertRow(), r);
    tbody.replaceWith(fresh);
  }

  function since(msEpoch) {
    const s = Math.max(0, Math.round((Date.now() - msEpoch) / 1000));
    if (s < 60) return `${s} s ago`;
    if (s < 3600) return `${Math.floor(s / 60)} min ago`;
    return new Date(msEpoch).toLocaleString();
  }

  function render(view) {
    $('node').textContent = `node ${view.node} · auth ${view.auth}`;
    const last = view.series[view.series.length - 1];
    const recent = view.series;
    // Plain numbers (no thousands separators): the hooks are read by tests and scripts.
    const plain = (n) => String(Math.round(n * 10) / 10);
    const connections = last ? last.connections : view.nodes.reduce((n, x) => n + x.connections, 0);
    $('connections').textContent = String(connections);
    $('rate').textContent = last ? `${plain(last.messages_in)} / ${plain(last.messages_out)}` : '–';
    $('rate').setAttribute('data-in', last ? plain(last.messages_in) : '');
    $('rate').setAttribute('data-out', last ? plain(last.messages_out) : '');
    $('latency').textContent = last ? `${ms(last.p50_ms)} / ${ms(last.p99_ms)}` : '–';
    const slow = recent.reduce((n, s) => n + s.slow_consumers, 0);
    const errors = recent.reduce((n, s) => n + s.errors, 0);
    $('trouble').textContent = `${fmt(slow)} / ${fmt(errors)}`;
    draw(view.series);

    $('sessions-count').textContent = view.sessions_total > view.sessions.length
      ? `(${view.sessions.length} of ${view.sessions_total})` : `(${view.sessions_total})`;
    fill('sessions', view.sessions, (row, s) => {
      row.setAttribute('data-session-id', String(s.id));
      row.setAttribute('data-user', s.user);
      cell(row, String(s.id), 'num');
      cell(row, s.user || '(connecting)');
      cell(row, s.transport);
      cell(row, s.address);
      cell(row, since(s.since_ms));
      cell(row, s.subscriptions.join(', '), 'subs');
      actionButton(row, 'Close', 'admin-close-session',
        `Close session ${s.id}${s.user ? ` of ${s.user}` : ''} (${s.transport}, ${s.address})? It gets an ERROR and is disconnected.`,
        () => act(`/admin/api/sessions/${s.id}/close`, `session ${s.id} closed`));
    });

    $('rooms-count').textContent = view.rooms_total > view.rooms.length
      ? `(${view.rooms.length} of ${view.rooms_total})` : `(${view.rooms_total})`;
    fill('rooms', view.rooms, (row, r) => {
      row.setAttribute('data-room', r.room);
      cell(row, r.room);
      cell(row, fmt(r.members), 'num');
      cell(row, fmt(r.last_seq), 'num');
      actionButton(row, 'Clear history', 'admin-clear-room',
        `Clear the history of room ${r.room}? Its kept messages are deleted for good.`,
        () => act(`/admin/api/rooms/${encodeURIComponent(r.room)}/clear`, `room ${r.room} cleared`));
    });

    fill('queues', view.queues, (row, q) => {
      row.setAttribute('data-queue', q.queue);
      cell(row, q.queue);
      cell(row, fmt(q.ready), 'num');
      cell(row, fmt(q.unacked), 'num');
      cell(row, fmt(q.consumers), 'num');
      actionButton(row, 'Purge', 'admin-purge-queue',
        `Purge queue ${q.queue}? Its ${fmt(q.ready)} waiting messages are deleted for good.`,
        () => act(`/admin/api/queues/${encodeURIComponent(q.queue)}/purge`, `queue ${q.queue} purged`));
    });

    fill('nodes', view.nodes, (row, n) => {
      cell(row, n.name);
      cell(row, fmt(n.connections), 'num');
      cell(row, since(n.last_seen_ms));
    });
  }

  // Every action is asked first, in a dialog of the page (not window.confirm, which a test
  // or a blocked popup would answer silently).
  let pending = null;
  $('confirm').addEventListener('close', () => {
    const run = pending;
    pending = null;
    if ($('confirm').returnValue === 'ok' && run) run();
  });
  function confirmThen(question, run) {
    $('confirm-text').textContent = question;
    pending = run;
    $('confirm').returnValue = '';
    $('confirm').showModal();
  }

  async function act(path, done) {
    const result = $('action-result');
    try {
      const response = await fetch(path, { method: 'POST', headers });
      const body = await response.json().catch(() => ({}));
      if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
      result.textContent = done;
      result.dataset.state = 'ok';
    } catch (e) {
      result.textContent = `failed: ${e.message}`;
      result.dataset.state = 'failed';
    }
    poll();
  }

  let timer = null;
  async function poll() {
    clearTimeout(timer);
    const status = $('updated');
    try {
      const response = await fetch('/admin/api/overview', { headers, cache: 'no-store' });
      if (!response.ok) {
        const body = await response.json().catch(() => ({}));
        throw new Error(body.error || `HTTP ${response.status}`);
      }
      const view = await response.json();
      render(view);
      const cluster = view.cluster === 'unreachable' ? ' · cluster unreachable: rooms, queues and nodes unknown' : '';
      status.textContent = `live · ${new Date().toLocaleTimeString()}${cluster}`;
      status.dataset.state = 'live';
    } catch (e) {
      status.textContent = `not updating: ${e.message}`;
      status.dataset.state = 'failed';
    }
    timer = setTimeout(poll, POLL_MS);
  }
  poll();
})();
