// The web joiner: joins a shared terminal through the relay's WebSocket at /join/ws.
//
// The page is served by uptermd at /join; the link is https://RELAY/join#CREDENTIAL. The
// credential stays in the fragment (never sent in a URL: browsers do not send fragments) and
// goes to the relay only inside the WebSocket, in the first (auth) message.
//
// Protocol (text frames are JSON, binary frames are terminal bytes):
//   page -> relay  {"type":"auth","credential":C,"cols":N,"rows":N}   first, once open
//                  {"type":"resize","cols":N,"rows":N}                  on terminal resize
//                  binary: what the joiner typed or pasted
//   relay -> page  {"type":"hello","host":"alice@laptop","role":"viewer"}  the host let us in
//                  {"type":"role","role":"typist"}                          role changed
//                  {"type":"notice","text":"..."}                           shown for a while
//                  binary: terminal output
// Close codes 4000-4099 are final (the reason is shown); anything else reconnects with backoff.
//
// No eval, no inline script or style of ours: the relay's Content-Security-Policy forbids them.

import { Terminal } from '@xterm/xterm';
import { FitAddon } from '@xterm/addon-fit';
import { Unicode11Addon } from '@xterm/addon-unicode11';
import { WebLinksAddon } from '@xterm/addon-web-links';
import { WebglAddon } from '@xterm/addon-webgl';

const WS_PATH = '/join/ws';
const RESIZE_DEBOUNCE_MS = 100;
const NOTICE_MS = 6000;
const BACKOFF_FIRST_S = 1;
const BACKOFF_MAX_S = 30;
// Large pastes go out in pieces of this size, so no single frame is huge.
const INPUT_CHUNK_BYTES = 16 * 1024;
const FINAL_CLOSE_MIN = 4000;
const FINAL_CLOSE_MAX = 4099;

const FINAL_CLOSE_TEXT = {
  4001: 'This link is wrong, expired or revoked: ask the host for a new one.',
  4002: 'The session has ended.',
  4003: 'The host removed you from the session.',
};

const ROLE_TEXT = {
  viewer: 'you are a viewer: you see the terminal, your keys do nothing',
  typist: 'you are a typist: you type into the shared terminal',
  moderator: 'you are a moderator: you type into the shared terminal and moderate it',
};

const INCOMPLETE_LINK =
  'This link is incomplete: ask the host for the whole web link, ending in #…';

const isMac = /Mac|iPhone|iPad|iPod/.test(navigator.platform || navigator.userAgent || '');
const encoder = new TextEncoder();

/** Everything the page knows; window.upterm reads it (the browser tests do). */
const app = {
  term: null,
  state: 'connecting', // 'connecting' | 'waiting' | 'open' | 'reconnecting' | 'closed'
  role: null,
  host: null,
  renderer: 'dom',
  closeCode: null,
  closeReason: null,
};

let ui = null;
let ws = null;
let credential = '';
let attempt = 0; // failed connections since the last hello, for the backoff
let connectedBefore = false; // a reconnect resets the screen (the host repaints it)
let resetPending = false;
let unloading = false;
let reconnectTimer = null;
let countdownTimer = null;
let noticeTimer = null;
let resizeTimer = null;
let lastSize = null; // the size the relay last heard of, on this socket
let baseStatus = { text: '', kind: '' };

function setState(state) {
  app.state = state;
  document.body.dataset.state = state;
}

// --- The banner ---------------------------------------------------------------------------

function showWho() {
  if (app.host === null) {
    ui.who.textContent = 'upterm: a shared terminal';
    return;
  }
  const role = app.role === null ? '' : ROLE_TEXT[app.role] || `you are a ${app.role}`;
  ui.who.textContent = `Hosted by ${app.host}` + (role ? ` · ${role}` : '');
}

function renderStatus(text, kind) {
  ui.status.textContent = text;
  ui.status.className = kind || '';
}

/** The lasting status line (notices show over it for a while, then it comes back). */
function setStatus(text, kind = '') {
  baseStatus = { text, kind };
  if (noticeTimer === null) renderStatus(text, kind);
}

function showNotice(text) {
  if (noticeTimer !== null) clearTimeout(noticeTimer);
  renderStatus(text, 'notice');
  noticeTimer = setTimeout(() => {
    noticeTimer = null;
    renderStatus(baseStatus.text, baseStatus.kind);
  }, NOTICE_MS);
}

function clearNotice() {
  if (noticeTimer !== null) {
    clearTimeout(noticeTimer);
    noticeTimer = null;
  }
}

/** A final state: says why, stops everything. */
function stop(text, code = null) {
  setState('closed');
  app.closeCode = code;
  app.closeReason = text;
  clearNotice();
  clearReconnect();
  setStatus(text, 'error');
  ui.termBox.classList.add('ended');
  if (app.term !== null) {
    // The last screen stays readable (and copyable); nothing more goes anywhere.
    app.term.options.disableStdin = true;
    app.term.options.cursorBlink = false;
  }
}

// --- The connection -----------------------------------------------------------------------

function wsUrl() {
  const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
  return `${scheme}//${location.host}${WS_PATH}`;
}

function isOpen(sock) {
  return sock !== null && sock === ws && sock.readyState === WebSocket.OPEN;
}

function sendJson(obj) {
  if (isOpen(ws)) ws.send(JSON.stringify(obj));
}

function sendBytes(bytes) {
  // Input counts only once the host let us in: keys typed while waiting are dropped.
  if (!isOpen(ws) || app.state !== 'open') return;
  for (let i = 0; i < bytes.length; i += INPUT_CHUNK_BYTES) {
    ws.send(bytes.subarray(i, i + INPUT_CHUNK_BYTES));
  }
}

function connect() {
  clearReconnect();
  setState('connecting');
  setStatus('Connecting…');
  resetPending = connectedBefore;
  lastSize = null;
  let sock;
  try {
    sock = new WebSocket(wsUrl());
  } catch (err) {
    // Only a malformed URL throws here; retrying would not help.
    stop(`Cannot connect to the relay: ${err && err.message ? err.message : err}`);
    return;
  }
  sock.binaryType = 'arraybuffer';
  ws = sock;

  sock.onopen = () => {
    if (sock !== ws) return;
    setState('waiting');
    setStatus('Waiting for the host…');
    lastSize = { cols: app.term.cols, rows: app.term.rows };
    sock.send(JSON.stringify({
      type: 'auth', credential, cols: lastSize.cols, rows: lastSize.rows,
    }));
  };

  sock.onmessage = (ev) => {
    if (sock !== ws) return;
    if (typeof ev.data === 'string') {
      onControl(ev.data);
    } else {
      beforeOutput();
      app.term.write(new Uint8Array(ev.data));
    }
  };

  // An error is always followed by a close: the close decides what happens next.
  sock.onerror = () => {};

  sock.onclose = (ev) => {
    if (sock !== ws) return;
    ws = null;
    if (unloading || app.state === 'closed') return;
    if (ev.code >= FINAL_CLOSE_MIN && ev.code <= FINAL_CLOSE_MAX) {
      const text = ev.reason || FINAL_CLOSE_TEXT[ev.code]
        || `The relay closed the connection (code ${ev.code}).`;
      stop(text, ev.code);
      return;
    }
    scheduleReconnect(ev.reason);
  };
}

/** Before the first output or hello of a reconnection: a clean screen for the repaint. */
function beforeOutput() {
  if (resetPending) {
    resetPending = false;
    app.term.reset();
  }
}

function onControl(text) {
  let msg;
  try {
    msg = JSON.parse(text);
  } catch {
    return;
  }
  if (msg === null || typeof msg !== 'object') return;
  switch (msg.type) {
    case 'hello':
      beforeOutput();
      connectedBefore = true;
      attempt = 0;
      app.host = typeof msg.host === 'string' ? msg.host : '';
      app.role = typeof msg.role === 'string' ? msg.role : null;
      setState('open');
      setStatus('Connected.');
      showWho();
      app.term.focus();
      break;
    case 'role':
      if (typeof msg.role === 'string') {
        app.role = msg.role;
        showWho();
      }
      break;
    case 'notice':
      if (typeof msg.text === 'string' && msg.text) showNotice(msg.text);
      break;
    default:
      break; // newer relays may say more: ignore what we do not know
  }
}

function clearReconnect() {
  if (reconnectTimer !== null) clearTimeout(reconnectTimer);
  if (countdownTimer !== null) clearInterval(countdownTimer);
  reconnectTimer = null;
  countdownTimer = null;
}

/** Tries again after a while; `reason` is the relay's word on why it closed, if any. */
function scheduleReconnect(reason = '') {
  clearReconnect();
  clearNotice(); // the lost connection matters more than a notice
  setState('reconnecting');
  const base = Math.min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** attempt);
  attempt = Math.min(attempt + 1, 16);
  // Jitter (0.75x to 1.25x, within the cap) so that joiners dropped together come back apart.
  const delayMs = Math.min(BACKOFF_MAX_S, base * (0.75 + Math.random() * 0.5)) * 1000;
  const deadline = Date.now() + delayMs;
  const tick = () => {
    const left = Math.max(1, Math.ceil((deadline - Date.now()) / 1000));
    const why = reason ? ` (${reason})` : '';
    setStatus(`Connection lost${why}, reconnecting in ${left}s…`, 'notice');
  };
  tick();
  countdownTimer = setInterval(tick, 1000);
  reconnectTimer = setTimeout(connect, delayMs);
}

// --- The terminal -------------------------------------------------------------------------

function openLink(_event, uri) {
  // The link regex only matches http(s); a new tab that cannot reach back to this page.
  window.open(uri, '_blank', 'noopener,noreferrer');
}

/**
 * Whether WebGL here is drawn by the CPU (SwiftShader, llvmpipe: VMs, remote desktops, no
 * GPU): xterm's WebGL renderer is then several times slower than its DOM renderer (a
 * headless Chromium showed a flood at about 2 MiB/s with it, 9 MiB/s without).
 */
function softwareWebgl() {
  try {
    const gl = document.createElement('canvas').getContext('webgl2');
    if (!gl) return true;
    const info = gl.getExtension('WEBGL_debug_renderer_info');
    const name = String(info ? gl.getParameter(info.UNMASKED_RENDERER_WEBGL) : gl.getParameter(gl.RENDERER));
    const lose = gl.getExtension('WEBGL_lose_context');
    if (lose) lose.loseContext();
    return /swiftshader|llvmpipe|softpipe|software/i.test(name);
  } catch {
    return true;
  }
}

function loadWebgl(term) {
  if (softwareWebgl()) {
    app.renderer = 'dom';
    return;
  }
  let webgl;
  try {
    webgl = new WebglAddon();
    webgl.onContextLoss(() => {
      try { webgl.dispose(); } catch { /* already gone */ }
      app.renderer = 'dom';
    });
    term.loadAddon(webgl);
    app.renderer = 'webgl';
  } catch (err) {
    // No WebGL2 here (or it failed): xterm's DOM renderer draws instead.
    try { if (webgl) webgl.dispose(); } catch { /* never activated */ }
    app.renderer = 'dom';
  }
}

/** Copy and paste keys; false tells xterm to leave the key alone (not send it). */
function keyHandler(term, ev) {
  const letter = ev.code === 'KeyC' ? 'c' : ev.code === 'KeyV' ? 'v' : (ev.key || '').toLowerCase();
  const combo = isMac
    ? ev.metaKey && !ev.ctrlKey && !ev.altKey && !ev.shiftKey
    : ev.ctrlKey && ev.shiftKey && !ev.altKey && !ev.metaKey;
  if (!combo) return true;
  if (letter === 'c') {
    if (ev.type === 'keydown') {
      ev.preventDefault();
      if (term.hasSelection() && navigator.clipboard) {
        navigator.clipboard.writeText(term.getSelection()).catch(() => {});
      }
    }
    return false;
  }
  if (letter === 'v') {
    // Not prevented: the browser's own paste fires a paste event on xterm's textarea, and
    // xterm pastes it (term.paste: bracketed paste, newlines as CR), with no permission prompt.
    return false;
  }
  return true;
}

function screenText() {
  const term = app.term;
  if (term === null) return '';
  const buf = term.buffer.active;
  const lines = [];
  for (let y = buf.viewportY; y < buf.viewportY + term.rows; y++) {
    const line = buf.getLine(y);
    lines.push(line ? line.translateToString(true) : '');
  }
  return lines.join('\n');
}

function setupTerminal() {
  const term = new Terminal({
    allowProposedApi: true, // the unicode11 addon needs it
    cursorBlink: true,
    scrollback: 5000,
    fontSize: 14,
    // A little leading: with the DOM renderer (software WebGL) a row is exactly one line
    // box, and DejaVu Sans Mono's underscore falls below it (file names lost their _).
    lineHeight: 1.15,
    fontFamily: '"DejaVu Sans Mono", Menlo, Monaco, Consolas, "Liberation Mono", '
      + '"Noto Sans Mono", "Ubuntu Mono", "Courier New", monospace',
    theme: { background: '#000000', foreground: '#d0d0d0' },
    macOptionIsMeta: false,
  });
  app.term = term;
  const fit = new FitAddon();
  term.loadAddon(fit);
  term.loadAddon(new Unicode11Addon());
  term.unicode.activeVersion = '11';
  term.loadAddon(new WebLinksAddon(openLink));
  term.open(ui.termBox);
  loadWebgl(term);
  term.attachCustomKeyEventHandler((ev) => keyHandler(term, ev));

  term.onData((data) => sendBytes(encoder.encode(data)));
  term.onBinary((data) => {
    const bytes = new Uint8Array(data.length);
    for (let i = 0; i < data.length; i++) bytes[i] = data.charCodeAt(i) & 0xff;
    sendBytes(bytes);
  });
  term.onTitleChange((title) => {
    document.title = title ? `upterm – ${title.slice(0, 200)}` : 'upterm';
  });
  term.onResize(({ cols, rows }) => {
    if (resizeTimer !== null) clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => {
      resizeTimer = null;
      if (!isOpen(ws) || lastSize === null) return; // the next auth carries the size
      if (lastSize.cols === cols && lastSize.rows === rows) return;
      lastSize = { cols, rows };
      sendJson({ type: 'resize', cols, rows });
    }, RESIZE_DEBOUNCE_MS);
  });

  const refit = () => {
    try { fit.fit(); } catch { /* not laid out yet */ }
  };
  refit();
  window.addEventListener('resize', refit);
  // The banner's height changes too (hello, long notices): refit whenever the box does.
  if (typeof ResizeObserver === 'function') new ResizeObserver(refit).observe(ui.termBox);
  return term;
}

// --- Start --------------------------------------------------------------------------------

function main() {
  ui = {
    who: document.getElementById('who'),
    status: document.getElementById('status'),
    termBox: document.getElementById('terminal'),
  };
  window.upterm = {
    get term() { return app.term; },
    get state() { return app.state; },
    get role() { return app.role; },
    get host() { return app.host; },
    get renderer() { return app.renderer; },
    get closeCode() { return app.closeCode; },
    get closeReason() { return app.closeReason; },
    screenText,
  };
  credential = location.hash.slice(1);
  // A link pasted into this tab over the old one changes only the fragment, which loads
  // nothing: start again with the new credential.
  window.addEventListener('hashchange', () => {
    if (location.hash.slice(1) !== credential) location.reload();
  });
  if (!credential) {
    stop(INCOMPLETE_LINK);
    return;
  }
  setupTerminal();
  // Leaving the page closes the socket quietly; coming back (back/forward cache) rejoins.
  window.addEventListener('pagehide', () => {
    unloading = true;
    clearReconnect();
    if (ws !== null) {
      const sock = ws;
      ws = null;
      try { sock.close(1000); } catch { /* closing anyway */ }
    }
  });
  window.addEventListener('pageshow', (ev) => {
    if (!ev.persisted || app.state === 'closed') return;
    unloading = false;
    connectedBefore = true;
    connect();
  });
  connect();
  app.term.focus();
}

main();
