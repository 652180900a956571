// Salon web app: a single page, plain ES modules, no build step.
// The HTTP contract it speaks is docs/api.md.
//
// Safety rule: text from the server or a model only reaches the page as text nodes, or as
// markdown rendered by marked and then sanitized by DOMPurify (renderMarkdown below).

import { Marked } from './vendor/marked.esm.js';
import DOMPurify from './vendor/purify.es.mjs';
import hljs from './vendor/highlight.min.js';
import { setupPersonalization } from './personalization.js';

// ---------------------------------------------------------------------------------------
// Small helpers

const $ = (id) => document.getElementById(id);

/** Build an element. attrs: class, dataset via "data-*", "on*" listeners, other attributes. */
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'class') el.className = value;
    else if (key.startsWith('on') && typeof value === 'function') {
      el.addEventListener(key.slice(2), value);
    } else if (key === 'text') el.textContent = value;
    else el.setAttribute(key, value === true ? '' : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

const ICONS = {
  copy: 'M8 8h11v11H8zM5 16V5h11',
  check: 'M5 12.5l4.5 4.5L19 7.5',
  edit: 'M4 20h4L19 9l-4-4L4 16v4zM13.5 6.5l4 4',
  regenerate: 'M20 11a8 8 0 1 0-2.3 5.7M20 5v6h-6',
  trash: 'M4 7h16M10 11v6M14 11v6M6 7l1 13h10l1-13M9 7V4h6v3',
  rename: 'M4 20h4L19 9l-4-4L4 16v4z',
  prev: 'M15 6l-6 6 6 6',
  next: 'M9 6l6 6-6 6',
  play: 'M8 5v14l11-7z',
  alert: 'M12 8v5M12 16.5v.5M10.3 3.9L2.4 18a2 2 0 0 0 1.7 3h15.8a2 2 0 0 0 1.7-3L13.7 3.9a2 2 0 0 0-3.4 0z',
};

function icon(name) {
  const svg = document.createElementNS('http://www.w3.org/2000/svg', 'svg');
  svg.setAttribute('viewBox', '0 0 24 24');
  svg.setAttribute('aria-hidden', 'true');
  const path = document.createElementNS('http://www.w3.org/2000/svg', 'path');
  path.setAttribute('d', ICONS[name]);
  svg.append(path);
  return svg;
}

function debounce(fn, ms) {
  let timer = 0;
  return (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function copyText(text) {
  try {
    if (navigator.clipboard && window.isSecureContext) {
      await navigator.clipboard.writeText(text);
      return true;
    }
  } catch { /* fall through to the legacy path */ }
  // Plain http on a LAN address is not a secure context: use a hidden textarea.
  const area = h('textarea', { class: 'offscreen', readonly: true, 'aria-hidden': 'true' });
  area.value = text;
  document.body.append(area);
  area.select();
  let ok = false;
  try { ok = document.execCommand('copy'); } catch { ok = false; }
  area.remove();
  return ok;
}

/** A button that copies text and shows a check mark for a moment. */
function copyButton(getText, { testid, label = 'Copy', withText = false, cls = 'icon-btn' } = {}) {
  const labelEl = withText ? h('span', {}, label) : null;
  const btn = h('button', {
    class: cls, type: 'button', 'data-testid': testid, title: label, 'aria-label': label,
  }, icon('copy'), labelEl);
  btn.addEventListener('click', async (event) => {
    event.stopPropagation();
    const ok = await copyText(getText());
    btn.replaceChildren(icon(ok ? 'check' : 'copy'), withText ? h('span', {}, ok ? 'Copied' : 'Copy failed') : null);
    btn.dataset.copied = ok ? 'true' : 'false';
    setTimeout(() => {
      btn.replaceChildren(icon('copy'), labelEl);
      delete btn.dataset.copied;
    }, 1500);
  });
  return btn;
}

function toast(message, { kind = 'error', timeout = 6000 } = {}) {
  const el = h('div', { class: `toast ${kind}`, role: kind === 'error' ? 'alert' : 'status', 'data-testid': 'toast' },
    h('span', { class: 'toast-text' }, message),
    h('button', { class: 'toast-close', type: 'button', 'aria-label': 'Dismiss', onclick: () => el.remove() }, '×'));
  $('toasts').append(el);
  if (timeout) setTimeout(() => el.remove(), timeout);
  return el;
}

function formatDate(iso) {
  if (!iso) return '';
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return '';
  return date.toLocaleString(undefined, { dateStyle: 'medium', timeStyle: 'short' });
}

// ---------------------------------------------------------------------------------------
// HTTP

class ApiError extends Error {
  constructor(status, message, code = null) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

const session = { user: null, csrf: null };
const REQUEST_TIMEOUT_MS = 20000;

function describeFailure(status, data, res) {
  const message = data && data.error && typeof data.error.message === 'string' ? data.error.message : null;
  if (message) return message;
  if (status === 502 || status === 503 || status === 504) {
    return 'The server is not reachable right now (it may be restarting). Try again in a moment.';
  }
  return `The server answered ${status} ${res.statusText || ''}`.trim();
}

/** JSON request. Throws ApiError with a readable message; never hangs longer than the timeout. */
async function api(method, path, body, { timeout = REQUEST_TIMEOUT_MS, auth = true } = {}) {
  const headers = { Accept: 'application/json' };
  const unsafe = method !== 'GET' && method !== 'HEAD';
  const init = { method, headers, credentials: 'same-origin', cache: 'no-store' };
  if (unsafe) {
    headers['Content-Type'] = 'application/json';
    if (session.csrf) headers['X-CSRF-Token'] = session.csrf;
  }
  if (body !== undefined) init.body = JSON.stringify(body);
  const controller = new AbortController();
  init.signal = controller.signal;
  const timer = setTimeout(() => controller.abort(), timeout);
  let res;
  let text;
  try {
    res = await fetch(path, init);
    text = await res.text();
  } catch {
    if (controller.signal.aborted) {
      throw new ApiError(0, 'The server did not answer in time. Check that it is running and try again.', 'timeout');
    }
    throw new ApiError(0, 'Cannot reach the server. Check that it is running and try again.', 'network');
  } finally {
    clearTimeout(timer);
  }
  let data = null;
  if (text) {
    try { data = JSON.parse(text); } catch { data = null; }
  }
  if (!res.ok) {
    const err = new ApiError(res.status, describeFailure(res.status, data, res), data?.error?.code ?? null);
    if (res.status === 401 && auth && session.user) onSessionLost();
    throw err;
  }
  return data;
}

function onSessionLost() {
  session.user = null;
  session.csrf = null;
  closeAllStreams();
  toast('Your session has ended. Please sign in again.', { kind: 'info' });
  showAuth();
}

// ---------------------------------------------------------------------------------------
// Markdown

const marked = new Marked({ gfm: true, breaks: false });
marked.use({
  renderer: {
    // Raw HTML written by a model is shown as text, not interpreted (DOMPurify would make it
    // safe anyway; showing it literally is what a chat user expects).
    html(token) {
      return escapeHtml(token.raw ?? token.text ?? '');
    },
  },
});

function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (ch) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[ch]);
}

DOMPurify.addHook('afterSanitizeAttributes', (node) => {
  if (node.tagName === 'A' && node.hasAttribute('href')) {
    node.setAttribute('target', '_blank');
    node.setAttribute('rel', 'noopener noreferrer nofollow');
  }
});

const PURIFY_OPTIONS = {
  USE_PROFILES: { html: true },
  FORBID_TAGS: ['style', 'form', 'input', 'button', 'textarea', 'select'],
  FORBID_ATTR: ['style'],
};

/** Markdown → sanitized HTML string. */
function renderMarkdown(text) {
  let html;
  try {
    html = marked.parse(text, { async: false });
  } catch {
    html = `<p>${escapeHtml(text)}</p>`;
  }
  return DOMPurify.sanitize(html, PURIFY_OPTIONS);
}

/** Fill `el` with rendered markdown; `final` adds syntax highlighting and copy buttons. */
function fillMarkdown(el, text, final) {
  el.innerHTML = renderMarkdown(text);
  for (const pre of el.querySelectorAll('pre')) {
    const code = pre.querySelector('code');
    if (!code) continue;
    const lang = (/(?:^|\s)language-([\w+#.-]+)/.exec(code.className) || [])[1] || '';
    const wrap = h('div', { class: 'code-block', 'data-testid': 'code-block' });
    const bar = h('div', { class: 'code-bar' }, h('span', { class: 'code-lang' }, lang || 'code'));
    const source = code.textContent;
    if (final) {
      bar.append(copyButton(() => source, { testid: 'copy-code', label: 'Copy code', cls: 'code-copy', withText: true }));
      if (source.length < 100000) {
        try {
          const result = lang && hljs.getLanguage(lang)
            ? hljs.highlight(source, { language: lang, ignoreIllegals: true })
            : hljs.highlightAuto(source);
          // hljs escapes its input; its output is sanitized once more to be sure.
          code.innerHTML = DOMPurify.sanitize(result.value, PURIFY_OPTIONS);
          code.classList.add('hljs');
        } catch { /* leave it plain */ }
      }
    }
    pre.replaceWith(wrap);
    wrap.append(bar, pre);
  }
}

// ---------------------------------------------------------------------------------------
// Server-sent events over fetch (so that re-attaching sends Last-Event-ID and failures are
// under our control).

class StreamAttachment {
  /**
   * @param {number|string} messageId
   * @param {{onDelta: Function, onDone: Function, onError: Function, onState: Function}} handlers
   */
  constructor(messageId, handlers) {
    this.messageId = messageId;
    this.handlers = handlers;
    this.lastEventId = null;
    this.text = '';
    this.closed = false;
    this.controller = null;
  }

  close() {
    this.closed = true;
    if (this.controller) this.controller.abort();
  }

  async run() {
    let failures = 0;
    while (!this.closed) {
      let gotEvent = false;
      try {
        this.controller = new AbortController();
        const headers = { Accept: 'text/event-stream' };
        if (this.lastEventId !== null) headers['Last-Event-ID'] = this.lastEventId;
        // The connect phase must not hang forever on a server that is down.
        const connectTimer = setTimeout(() => this.controller.abort(), REQUEST_TIMEOUT_MS);
        let res;
        try {
          res = await fetch(`/api/messages/${encodeURIComponent(this.messageId)}/stream`, {
            headers, credentials: 'same-origin', cache: 'no-store', signal: this.controller.signal,
          });
        } finally {
          clearTimeout(connectTimer);
        }
        if (!res.ok) {
          let data = null;
          try { data = await res.json(); } catch { data = null; }
          const message = describeFailure(res.status, data, res);
          if (res.status === 401 && session.user) { onSessionLost(); return; }
          if (res.status >= 400 && res.status < 500) {
            this.closed = true;
            this.handlers.onError({ message, code: data?.error?.code ?? 'stream_failed', partial: null });
            return;
          }
          throw new ApiError(res.status, message);
        }
        this.handlers.onState('live');
        const finished = await this.read(res.body, () => {
          gotEvent = true;
          failures = 0;
        });
        if (finished) return;
        // The server closed the stream before done/error: re-attach.
      } catch (err) {
        if (this.closed) return;
        if (err && err.name === 'AbortError' && this.closed) return;
      }
      if (this.closed) return;
      if (!gotEvent) failures += 1;
      if (failures >= 8) {
        this.handlers.onState('lost');
        return;
      }
      this.handlers.onState('reconnecting');
      await sleep(Math.min(500 * 2 ** Math.max(0, failures - 1), 5000));
    }
  }

  /** Reads one response body; returns true once done or error arrived. */
  async read(body, onEvent) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = '';
    let event = { type: '', data: [], id: null };
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done && !buffer.endsWith('\r')) return false;
        // At the end, a trailing \r is a line end after all.
        buffer += done ? '\n' : value;
        let pos = 0;
        const newline = /\r\n|\r|\n/g;
        for (;;) {
          newline.lastIndex = pos;
          const found = newline.exec(buffer);
          if (!found) break;
          const lineEnd = found.index;
          // A lone \r at the end of the chunk might be the start of \r\n: wait for more.
          if (found[0] === '\r' && lineEnd + 1 === buffer.length) break;
          const line = buffer.slice(pos, lineEnd);
          pos = lineEnd + found[0].length;
          if (line === '') {
            if (event.data.length || event.type) {
              if (event.id !== null) this.lastEventId = event.id;
              onEvent();
              if (this.dispatch(event.type || 'message', event.data.join('\n'))) return true;
            }
            event = { type: '', data: [], id: null };
            continue;
          }
          if (line.startsWith(':')) continue; // comment / keep-alive
          const colon = line.indexOf(':');
          const field = colon < 0 ? line : line.slice(0, colon);
          let val = colon < 0 ? '' : line.slice(colon + 1);
          if (val.startsWith(' ')) val = val.slice(1);
          if (field === 'event') event.type = val;
          else if (field === 'data') event.data.push(val);
          else if (field === 'id' && !val.includes('\0')) event.id = val;
        }
        buffer = buffer.slice(pos);
        if (done) return false;
      }
    } finally {
      reader.cancel().catch(() => { /* already closed or aborted */ });
    }
  }

  /** Returns true when the stream is over. */
  dispatch(type, raw) {
    if (this.closed) return true;
    let data;
    try { data = raw ? JSON.parse(raw) : {}; } catch { return false; }
    if (type === 'delta') {
      this.text += typeof data.text === 'string' ? data.text : '';
      this.handlers.onDelta(this.text);
      return false;
    }
    if (type === 'done') {
      this.closed = true;
      this.handlers.onDone(data);
      return true;
    }
    if (type === 'error') {
      this.closed = true;
      this.handlers.onError(data);
      return true;
    }
    return false;
  }
}

// ---------------------------------------------------------------------------------------
// Boot and authentication

const boot = {
  show(text, retry = false) {
    $('boot').hidden = false;
    $('auth').hidden = true;
    $('app').hidden = true;
    $('boot-text').textContent = text;
    $('boot-retry').hidden = !retry;
    document.body.dataset.screen = retry ? 'error' : 'loading';
  },
};

async function start() {
  boot.show('Loading…');
  try {
    const me = await api('GET', '/api/auth/me', undefined, { auth: false });
    setSession(me);
    await showApp();
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) {
      await showAuth();
      return;
    }
    boot.show(err.message || 'Something went wrong while loading Salon.', true);
  }
}

function setSession(data) {
  session.user = data.user;
  session.csrf = data.csrf_token ?? session.csrf;
}

const auth = { mode: 'login', state: null };

async function showAuth() {
  closeAllStreams();
  try {
    auth.state = await api('GET', '/api/auth/state', undefined, { auth: false });
  } catch (err) {
    boot.show(err.message, true);
    return;
  }
  setAuthMode(auth.state.has_users ? 'login' : 'setup');
  $('boot').hidden = true;
  $('app').hidden = true;
  $('auth').hidden = false;
  document.body.dataset.screen = 'auth';
  $('auth-username').focus();
}

function setAuthMode(mode) {
  auth.mode = mode;
  const form = $('auth-form');
  form.dataset.mode = mode;
  $('auth-error').hidden = true;
  const title = { setup: 'Create the admin account', login: 'Sign in to Salon', signup: 'Create your account' }[mode];
  const subtitle = {
    setup: 'Welcome! This first account administers this Salon server.',
    login: '',
    signup: 'Pick a username and a password of at least 8 characters.',
  }[mode];
  $('auth-title').textContent = title;
  $('auth-subtitle').textContent = subtitle;
  $('auth-subtitle').hidden = !subtitle;
  $('auth-submit').textContent = mode === 'login' ? 'Sign in' : 'Create account';
  $('auth-password').autocomplete = mode === 'login' ? 'current-password' : 'new-password';
  const row = $('auth-switch-row');
  if (mode === 'login' && auth.state?.signup_open) {
    row.hidden = false;
    $('auth-switch-text').textContent = 'No account yet?';
    $('auth-switch').textContent = 'Sign up';
  } else if (mode === 'signup') {
    row.hidden = false;
    $('auth-switch-text').textContent = 'Already have an account?';
    $('auth-switch').textContent = 'Sign in';
  } else {
    row.hidden = true;
  }
}

$('auth-switch').addEventListener('click', (event) => {
  event.preventDefault();
  setAuthMode(auth.mode === 'login' ? 'signup' : 'login');
  $('auth-username').focus();
});

$('auth-form').addEventListener('submit', async (event) => {
  event.preventDefault();
  const username = $('auth-username').value.trim();
  const password = $('auth-password').value;
  const errorEl = $('auth-error');
  const fail = (message) => {
    errorEl.textContent = message;
    errorEl.hidden = false;
  };
  if (!username || !password) return fail('Enter a username and a password.');
  if (auth.mode !== 'login' && password.length < 8) return fail('The password needs at least 8 characters.');
  const submit = $('auth-submit');
  submit.disabled = true;
  errorEl.hidden = true;
  try {
    const path = auth.mode === 'login' ? '/api/auth/login' : '/api/auth/signup';
    const data = await api('POST', path, { username, password }, { auth: false });
    setSession(data);
    $('auth-password').value = '';
    await showApp();
  } catch (err) {
    if (err.status === 401) fail('Wrong username or password.');
    else fail(err.message);
  } finally {
    submit.disabled = false;
  }
});

$('boot-retry').addEventListener('click', () => start());

$('sign-out').addEventListener('click', async () => {
  closeAllStreams();
  try {
    await api('POST', '/api/auth/logout');
  } catch (err) {
    if (err.status !== 401) toast(err.message);
  }
  session.user = null;
  session.csrf = null;
  resetChat();
  history.replaceState(null, '', '/');
  await showAuth();
});

// ---------------------------------------------------------------------------------------
// App shell

const models = { list: [], default: null };

async function showApp() {
  // Everything the first screen needs is loaded before it is shown: a message typed into
  // a half-initialised app would otherwise be lost when the route is applied.
  try {
    const data = await api('GET', '/api/models');
    models.list = (data.data || []).map((m) => m.id);
    models.default = (data.data || []).find((m) => m.default)?.id ?? models.list[0] ?? null;
  } catch (err) {
    if (!session.user) return; // the session ended meanwhile (401): the sign-in form is up
    models.list = [];
    models.default = null;
    toast(`Could not load the models: ${err.message}`);
  }
  const user = session.user;
  $('user-name').textContent = user.username;
  $('user-role').textContent = user.role === 'admin' ? 'Admin' : '';
  $('user-avatar').textContent = (user.username[0] || '?').toUpperCase();
  side.q = '';
  $('search').value = '';
  $('boot').hidden = true;
  $('auth').hidden = true;
  $('app').hidden = false;
  document.body.dataset.screen = 'app';
  loadConversations(true);
  await route();
}

// ---------------------------------------------------------------------------------------
// Sidebar: conversation list

const side = { items: [], next: null, q: '', loading: false, token: 0, error: null };

async function loadConversations(reset) {
  if (reset) {
    side.token += 1;
    side.items = [];
    side.next = null;
    side.loading = false;
    side.error = null;
  } else if (side.loading || !side.next) {
    return;
  }
  const token = side.token;
  side.loading = true;
  renderConvStatus();
  const params = new URLSearchParams({ limit: '50' });
  if (side.q) params.set('q', side.q);
  if (!reset && side.next) params.set('before', side.next);
  try {
    const data = await api('GET', `/api/conversations?${params}`);
    if (token !== side.token) return;
    const known = new Set(side.items.map((c) => c.id));
    for (const conv of data.data || []) if (!known.has(conv.id)) side.items.push(conv);
    side.next = data.next ?? null;
    side.error = null;
  } catch (err) {
    if (token !== side.token) return;
    side.error = err.message;
  } finally {
    if (token === side.token) side.loading = false;
  }
  renderConvList();
  // Keep filling while the sentinel is visible (a tall screen, a short page).
  if (side.next && sentinelVisible()) loadConversations(false);
}

function sentinelVisible() {
  const scroller = $('conv-scroll');
  const sentinel = $('conv-sentinel');
  return sentinel.getBoundingClientRect().top < scroller.getBoundingClientRect().bottom + 200;
}

function renderConvStatus() {
  const el = $('conv-status');
  let text = '';
  if (side.error) text = `Could not load conversations: ${side.error}`;
  else if (side.loading) text = 'Loading…';
  else if (!side.items.length) text = side.q ? 'No conversations match.' : 'No conversations yet.';
  el.textContent = text;
  el.hidden = !text;
}

function renderConvList() {
  const list = $('conv-list');
  const rows = side.items.map((conv) => convItem(conv));
  list.replaceChildren(...rows);
  renderConvStatus();
}

function convTitle(conv) {
  return (conv.title || '').trim() || 'New chat';
}

function convItem(conv) {
  const active = chat.conv && chat.conv.id === conv.id;
  const li = h('li', {
    class: `conv-item${active ? ' active' : ''}`, 'data-testid': 'conversation-item', 'data-id': conv.id,
  });
  const link = h('a', {
    class: 'conv-link', href: convPath(conv.id), 'data-testid': 'conversation-link',
    'aria-current': active ? 'page' : null, title: convTitle(conv),
  }, convTitle(conv));
  link.addEventListener('click', (event) => {
    if (event.button !== 0 || event.metaKey || event.ctrlKey || event.shiftKey || event.altKey) return;
    event.preventDefault();
    closeSidebar();
    navigate(convPath(conv.id));
  });
  const rename = h('button', {
    class: 'icon-btn small', type: 'button', title: 'Rename', 'aria-label': 'Rename', 'data-testid': 'conversation-rename',
  }, icon('rename'));
  const del = h('button', {
    class: 'icon-btn small', type: 'button', title: 'Delete', 'aria-label': 'Delete', 'data-testid': 'conversation-delete',
  }, icon('trash'));
  rename.addEventListener('click', () => startRename(li, conv));
  link.addEventListener('dblclick', (event) => {
    event.preventDefault();
    startRename(li, conv);
  });
  del.addEventListener('click', () => deleteConversation(conv));
  li.append(link, h('span', { class: 'conv-actions' }, rename, del));
  return li;
}

function startRename(li, conv) {
  const input = h('input', {
    class: 'rename-input', value: conv.title || '', maxlength: 200, 'aria-label': 'Conversation title', 'data-testid': 'rename-input',
  });
  let done = false;
  const finish = async (save) => {
    if (done) return;
    done = true;
    const title = input.value.trim();
    if (save && title && title !== conv.title) {
      try {
        const updated = await api('PATCH', `/api/conversations/${encodeURIComponent(conv.id)}`, { title });
        updateConvEverywhere(updated, ['title', 'updated_at']);
      } catch (err) {
        toast(`Could not rename: ${err.message}`);
      }
    }
    renderConvList();
  };
  input.addEventListener('keydown', (event) => {
    if (event.key === 'Enter') { event.preventDefault(); finish(true); }
    else if (event.key === 'Escape') { event.preventDefault(); finish(false); }
  });
  input.addEventListener('blur', () => finish(true));
  li.replaceChildren(input);
  li.classList.add('renaming');
  input.focus();
  input.select();
}

/** Merge `fields` of a conversation the server sent into what is shown. Only the named
 * fields: a late answer must not undo a change made meanwhile (e.g. the model picked). */
function updateConvEverywhere(conv, fields) {
  const pick = {};
  for (const key of fields) if (key in conv) pick[key] = conv[key];
  const index = side.items.findIndex((c) => c.id === conv.id);
  if (index >= 0) side.items[index] = { ...side.items[index], ...pick };
  if (chat.conv && chat.conv.id === conv.id) {
    Object.assign(chat.conv, pick);
    renderChatHeader();
  }
}

/** Put a conversation at the top of the list (it just got a message). */
function bumpConversation(conv) {
  if (side.q) return; // the filtered list keeps its order; it refreshes on the next search
  if (conv.temporary) return; // temporary chats are not listed
  side.items = [conv, ...side.items.filter((c) => c.id !== conv.id)];
  renderConvList();
}

async function deleteConversation(conv) {
  const ok = await confirmDialog('Delete this chat?', `“${convTitle(conv)}” and all its messages will be deleted. This cannot be undone.`);
  if (!ok) return;
  try {
    await api('DELETE', `/api/conversations/${encodeURIComponent(conv.id)}`);
  } catch (err) {
    if (err.status !== 404) {
      toast(`Could not delete: ${err.message}`);
      return;
    }
  }
  side.items = side.items.filter((c) => c.id !== conv.id);
  renderConvList();
  if (chat.conv && chat.conv.id === conv.id) navigate('/');
}

$('conv-scroll').addEventListener('scroll', () => {
  if (side.next && !side.loading && sentinelVisible()) loadConversations(false);
}, { passive: true });

$('search').addEventListener('input', debounce(() => {
  const q = $('search').value.trim();
  if (q === side.q) return;
  side.q = q;
  loadConversations(true);
}, 250));

$('search').addEventListener('keydown', (event) => {
  if (event.key === 'Escape' && $('search').value) {
    $('search').value = '';
    side.q = '';
    loadConversations(true);
  }
});

// Mobile: the sidebar slides in over the chat.
function openSidebar() {
  document.body.classList.add('sidebar-open');
  $('scrim').hidden = false;
  $('sidebar-toggle').setAttribute('aria-expanded', 'true');
}
function closeSidebar() {
  document.body.classList.remove('sidebar-open');
  $('scrim').hidden = true;
  $('sidebar-toggle').setAttribute('aria-expanded', 'false');
}
$('sidebar-toggle').addEventListener('click', () => {
  if (document.body.classList.contains('sidebar-open')) closeSidebar();
  else openSidebar();
});
$('scrim').addEventListener('click', closeSidebar);

$('new-chat').addEventListener('click', () => {
  closeSidebar();
  navigate('/');
  $('composer').focus();
});

// ---------------------------------------------------------------------------------------
// Routing: / is a new chat, /c/<id> a conversation (the server serves index.html for both).

function convPath(id) {
  return `/c/${encodeURIComponent(id)}`;
}

function navigate(path) {
  if (location.pathname !== path || location.hash) history.pushState(null, '', path);
  route();
}

window.addEventListener('popstate', () => {
  if (session.user) route();
});

async function route() {
  // #/c/<id> links (older bookmarks) are accepted too.
  const match = /^\/c\/([^/]+)$/.exec(location.pathname) || /^#\/c\/([^/]+)$/.exec(location.hash);
  if (match) {
    const id = decodeURIComponent(match[1]);
    if (!chat.conv || chat.conv.id !== id) await openConversation(id);
  } else {
    if (location.pathname !== '/') history.replaceState(null, '', '/');
    newChat();
  }
}

// ---------------------------------------------------------------------------------------
// Chat

const PAGE = 50;

const chat = {
  conv: null,
  messages: [], // the loaded part of the active branch, oldest first
  hasMore: false,
  loadingOlder: false,
  token: 0, // bumps whenever another conversation is shown; late answers are dropped
  els: new Map(), // message id → element
  streams: new Map(), // message id → StreamAttachment
  dirty: new Set(), // message ids whose streaming text needs a repaint
  model: null, // the model picked for a new chat
  loading: false,
};

function resetChat() {
  closeAllStreams();
  chat.token += 1;
  chat.conv = null;
  chat.messages = [];
  chat.hasMore = false;
  chat.loadingOlder = false;
  chat.loading = false;
  chat.els.clear();
  chat.dirty.clear();
  $('message-list').replaceChildren();
}

function closeAllStreams() {
  for (const stream of chat.streams.values()) stream.close();
  chat.streams.clear();
}

function newChat() {
  pers.onNewChat();
  resetChat();
  chat.model = models.default;
  renderChatHeader();
  renderMessages();
  renderConvList();
  updateComposer();
}

function currentModel() {
  if (chat.conv && chat.conv.model) return chat.conv.model;
  return chat.model || models.default;
}

function renderChatHeader() {
  $('chat-title').textContent = chat.conv ? convTitle(chat.conv) : 'New chat';
  document.title = chat.conv ? `${convTitle(chat.conv)} · Salon` : 'Salon';
  const wrap = $('model-picker-wrap');
  const picker = $('model-picker');
  const current = currentModel();
  const ids = [...models.list];
  if (current && !ids.includes(current)) ids.push(current);
  wrap.hidden = ids.length <= 1;
  picker.replaceChildren(...ids.map((id) => h('option', { value: id },
    models.list.includes(id) ? id : `${id} (not available)`)));
  if (current) picker.value = current;
  pers.onHeader();
}

$('model-picker').addEventListener('change', async () => {
  const model = $('model-picker').value;
  if (!chat.conv) {
    chat.model = model;
    return;
  }
  const conv = chat.conv;
  const previous = conv.model;
  // Takes effect at once: a message sent before the PATCH returns already uses it.
  conv.model = model;
  const item = side.items.find((c) => c.id === conv.id);
  if (item) item.model = model;
  try {
    await api('PATCH', `/api/conversations/${encodeURIComponent(conv.id)}`, { model });
  } catch (err) {
    if (conv.model === model) {
      conv.model = previous;
      if (item) item.model = previous;
    }
    toast(`Could not change the model: ${err.message}`);
    renderChatHeader();
  }
});

async function openConversation(id) {
  resetChat();
  const token = chat.token;
  chat.loading = true;
  chat.conv = side.items.find((c) => c.id === id) || { id, title: '', model: null };
  renderChatHeader();
  renderConvList();
  renderMessages();
  setOlderStatus('Loading…');
  updateComposer();
  try {
    const [conv, page] = await Promise.all([
      api('GET', `/api/conversations/${encodeURIComponent(id)}`),
      api('GET', `/api/conversations/${encodeURIComponent(id)}/messages?limit=${PAGE}`),
    ]);
    if (token !== chat.token) return;
    chat.conv = conv;
    chat.messages = page.data || [];
    chat.hasMore = Boolean(page.has_more);
  } catch (err) {
    if (token !== chat.token) return;
    chat.loading = false;
    if (err.status === 404) {
      toast('That conversation does not exist (or is not yours).');
      history.replaceState(null, '', '/');
      newChat();
    } else {
      setOlderStatus(`Could not load this conversation: ${err.message}`);
      chat.conv = chat.conv || { id, title: '' };
      updateComposer();
    }
    return;
  }
  chat.loading = false;
  setOlderStatus('');
  renderChatHeader();
  renderConvList();
  renderMessages();
  scrollToBottom();
  attachStreaming();
  updateComposer();
  pers.onConversationOpened();
  if (window.matchMedia('(pointer: fine)').matches) $('composer').focus();
}

/** Reload the newest page of the active branch (after a branch switch, an edit). */
async function reloadMessages() {
  if (!chat.conv) return;
  const id = chat.conv.id;
  closeAllStreams();
  chat.token += 1;
  const token = chat.token;
  try {
    const [conv, page] = await Promise.all([
      api('GET', `/api/conversations/${encodeURIComponent(id)}`),
      api('GET', `/api/conversations/${encodeURIComponent(id)}/messages?limit=${PAGE}`),
    ]);
    if (token !== chat.token) return;
    chat.conv = conv;
    chat.messages = page.data || [];
    chat.hasMore = Boolean(page.has_more);
  } catch (err) {
    if (token === chat.token) toast(err.message);
    return;
  }
  chat.els.clear();
  chat.dirty.clear();
  renderChatHeader();
  renderMessages();
  scrollToBottom();
  attachStreaming();
  updateComposer();
}

function setOlderStatus(text) {
  const el = $('older-status');
  el.textContent = text || '';
  el.hidden = !text;
}

// --- rendering ------------------------------------------------------------------------

function renderMessages() {
  const list = $('message-list');
  chat.els.clear();
  const frag = document.createDocumentFragment();
  for (const msg of chat.messages) frag.append(messageEl(msg));
  list.replaceChildren(frag);
  $('empty-state').hidden = Boolean(chat.messages.length) || chat.loading;
}

function isLast(msg) {
  return chat.messages.length > 0 && chat.messages[chat.messages.length - 1].id === msg.id;
}

const STATUS_TEXT = {
  stopped: 'Stopped',
  incomplete: 'Incomplete — the server stopped before this answer was finished',
  error: 'Error',
};

function messageEl(msg) {
  const el = h('article', {
    class: `msg msg-${msg.role}`,
    'data-testid': 'message',
    'data-role': msg.role,
    'data-status': msg.status,
    'data-id': msg.id,
  });
  fillMessageEl(el, msg);
  chat.els.set(String(msg.id), el);
  return el;
}

function fillMessageEl(el, msg) {
  el.dataset.status = msg.status;
  el.classList.remove('editing');
  const body = h('div', { class: 'msg-body' });
  const content = h('div', { class: msg.role === 'user' ? 'msg-content plain' : 'msg-content markdown', 'data-testid': 'message-content' });
  if (msg.role === 'user') {
    content.textContent = msg.content;
  } else if (msg.status === 'streaming') {
    const text = streamingText(msg);
    if (text) fillMarkdown(content, text, false);
    content.append(h('span', { class: 'cursor', 'aria-hidden': 'true' }));
  } else {
    fillMarkdown(content, msg.content, true);
  }
  if (msg.role === 'assistant' && msg.status === 'streaming' && !streamingText(msg)) {
    content.append(h('span', { class: 'thinking', 'data-testid': 'thinking', 'aria-label': 'Generating' },
      h('i'), h('i'), h('i')));
  }
  body.append(content);
  const note = safetyNote(msg);
  if (note) body.append(note);
  pers.decorateMessage(msg, body);

  if (msg.role === 'assistant' && ['stopped', 'incomplete', 'error'].includes(msg.status)) {
    body.append(statusBox(msg));
  }
  if (msg.role === 'assistant' && msg.status === 'streaming') {
    const stream = chat.streams.get(String(msg.id));
    if (stream && stream.state && stream.state !== 'live') {
      body.append(connectionBox(msg, stream.state));
    }
  }
  body.append(actionsBar(msg));
  el.replaceChildren(body);
}

// What salon's safety layer did to an answer, said plainly so nothing changes silently.
const SAFETY_TEXT = {
  blocked: 'Answered by salon: this request was not sent to the model.',
  recovered: 'The model first declined this harmless request; salon asked again.',
  recovery_failed: 'The model declined this request, also when asked again.',
  refusal_kept: 'The model declined this request. It may be harmful, so salon did not ask again, and the answer ends with the refusal.',
  caution: 'This request looked possibly harmful, so the model was asked to answer with care.',
};

function safetyNote(msg) {
  const action = msg.safety && msg.safety.action;
  if (msg.role !== 'assistant' || !SAFETY_TEXT[action]) return null;
  // Another model gave the answer (the operator's recovery model): say which.
  const text = action === 'recovered' && msg.safety.model
    ? `The model first declined this harmless request; salon asked ${msg.safety.model} instead.`
    : SAFETY_TEXT[action];
  return h('div', { class: 'msg-safety', 'data-testid': 'safety-note', 'data-action': action }, text);
}

function statusBox(msg) {
  const box = h('div', { class: `msg-status status-${msg.status}`, 'data-testid': 'message-status' });
  box.append(icon('alert'));
  // A stop salon made itself (a model repeating itself) says why; the user's own says "Stopped".
  const label = msg.status === 'error'
    ? (msg.error || 'The model failed to answer.')
    : (msg.status === 'stopped' && msg.error) || STATUS_TEXT[msg.status];
  box.append(h('span', { class: 'status-text', 'data-testid': msg.status === 'error' ? 'message-error' : 'status-label' }, label));
  const actions = h('span', { class: 'status-actions' });
  if (msg.content) {
    actions.append(h('button', {
      class: 'btn small', type: 'button', 'data-testid': 'continue', onclick: () => continueMessage(msg),
    }, icon('play'), 'Continue'));
  }
  actions.append(h('button', {
    class: 'btn small', type: 'button', 'data-testid': 'regenerate', onclick: () => regenerate(msg),
  }, icon('regenerate'), 'Regenerate'));
  box.append(actions);
  return box;
}

function connectionBox(msg, state) {
  const text = state === 'lost' ? 'Lost the connection to the server.' : 'Reconnecting…';
  const box = h('div', { class: 'msg-status status-connection', 'data-testid': 'connection-status' }, icon('alert'),
    h('span', { class: 'status-text' }, text));
  if (state === 'lost') {
    box.append(h('span', { class: 'status-actions' }, h('button', {
      class: 'btn small', type: 'button', 'data-testid': 'reattach',
      onclick: () => { chat.streams.delete(String(msg.id)); attach(msg); rerender(msg); },
    }, 'Retry')));
  }
  return box;
}

function actionsBar(msg) {
  const bar = h('div', { class: 'msg-actions' });
  const siblings = Array.isArray(msg.siblings) ? msg.siblings : [];
  if (siblings.length > 1) {
    const index = siblings.findIndex((s) => String(s) === String(msg.id));
    const busy = chat.messages.some((m) => m.status === 'streaming');
    bar.append(h('span', { class: 'branch', 'data-testid': 'branch-switcher' },
      h('button', {
        class: 'icon-btn small', type: 'button', 'data-testid': 'branch-prev', 'aria-label': 'Previous version',
        disabled: index <= 0 || busy, onclick: () => switchBranch(siblings[index - 1]),
      }, icon('prev')),
      h('span', { class: 'branch-label', 'data-testid': 'branch-label' }, `${index + 1} / ${siblings.length}`),
      h('button', {
        class: 'icon-btn small', type: 'button', 'data-testid': 'branch-next', 'aria-label': 'Next version',
        disabled: index >= siblings.length - 1 || busy, onclick: () => switchBranch(siblings[index + 1]),
      }, icon('next'))));
  }
  if (msg.status !== 'streaming') {
    bar.append(copyButton(() => msg.content, { testid: 'copy-message', label: 'Copy message' }));
  }
  if (msg.role === 'user') {
    const busy = chat.messages.some((m) => m.status === 'streaming');
    bar.append(h('button', {
      class: 'icon-btn', type: 'button', 'data-testid': 'edit', title: 'Edit', 'aria-label': 'Edit message',
      disabled: busy, onclick: () => startEdit(msg),
    }, icon('edit')));
  }
  if (msg.role === 'assistant' && msg.status === 'complete' && isLast(msg)) {
    bar.append(h('button', {
      class: 'icon-btn', type: 'button', 'data-testid': 'regenerate', title: 'Regenerate', 'aria-label': 'Regenerate answer',
      onclick: () => regenerate(msg),
    }, icon('regenerate')));
  }
  if (msg.role === 'assistant' && msg.model && msg.status !== 'streaming' && models.list.length > 1) {
    bar.append(h('span', { class: 'msg-model muted small', 'data-testid': 'message-model' }, msg.model));
  }
  return bar;
}

function rerender(msg) {
  const el = chat.els.get(String(msg.id));
  if (el) fillMessageEl(el, msg);
}

/** Repaint only the action bars, which depend on what is last and what is running
 * (cheap: no markdown is rendered again, however many messages are loaded). */
function refreshActions() {
  for (const msg of chat.messages) {
    const el = chat.els.get(String(msg.id));
    if (!el || el.classList.contains('editing')) continue;
    el.querySelector(':scope > .msg-body > .msg-actions')?.replaceWith(actionsBar(msg));
  }
}

function streamingText(msg) {
  const stream = chat.streams.get(String(msg.id));
  if (!stream) return msg.content;
  // A fresh attachment replays the text from the start; until the replay caught up with
  // what we already show, keep showing that (no flash of a shorter text).
  return stream.text.length >= (stream.initialLength || 0) ? stream.text : msg.content;
}

// Streaming repaint: at most once per animation frame, only the text of running messages.
// Each repaint re-renders the whole markdown of the message; when that gets expensive (a
// very long answer) repaints are spaced out so that rendering stays under ~20% of the time.
let frameRequested = false;
let repaintCost = 0;
let repaintEnd = 0;
function scheduleRepaint(id) {
  chat.dirty.add(String(id));
  if (frameRequested) return;
  frameRequested = true;
  const wait = repaintCost * 4 - (performance.now() - repaintEnd);
  if (wait > 16) setTimeout(() => requestAnimationFrame(repaint), wait);
  else requestAnimationFrame(repaint);
}

function repaint() {
  frameRequested = false;
  const started = performance.now();
  const stick = nearBottom();
  for (const id of chat.dirty) {
    const msg = chat.messages.find((m) => String(m.id) === id);
    const el = chat.els.get(id);
    if (!msg || !el || msg.status !== 'streaming') continue;
    const content = el.querySelector('[data-testid="message-content"]');
    const text = streamingText(msg);
    fillMarkdown(content, text, false);
    content.append(h('span', { class: 'cursor', 'aria-hidden': 'true' }));
    el.querySelector('.thinking')?.remove();
  }
  chat.dirty.clear();
  if (stick) scrollToBottom();
  repaintEnd = performance.now();
  repaintCost = repaintEnd - started;
}

// --- streams --------------------------------------------------------------------------

function attachStreaming() {
  for (const msg of chat.messages) {
    if (msg.role === 'assistant' && msg.status === 'streaming') attach(msg);
  }
}

function findMessage(id) {
  return chat.messages.find((m) => String(m.id) === String(id));
}

function attach(msg) {
  const key = String(msg.id);
  if (chat.streams.has(key)) return;
  const token = chat.token;
  const stream = new StreamAttachment(msg.id, {
    onDelta: () => {
      if (token !== chat.token) return;
      const current = findMessage(key);
      if (current && current.status === 'streaming') {
        current.content = streamingText(current);
        scheduleRepaint(key);
      }
    },
    onDone: (final) => {
      if (token !== chat.token) return;
      chat.streams.delete(key);
      finishMessage(key, final && final.id !== undefined ? final : { ...findMessage(key), status: 'complete' });
      pers.onAnswerDone(findMessage(key) || final);
    },
    onError: (data) => {
      if (token !== chat.token) return;
      chat.streams.delete(key);
      const current = findMessage(key) || msg;
      const partial = data && data.partial && data.partial.id !== undefined ? data.partial : null;
      const message = (data && data.message) || 'The model failed to answer.';
      finishMessage(key, {
        ...current,
        ...(partial || {}),
        content: partial ? partial.content : stream.text || current.content,
        status: partial && partial.status && partial.status !== 'streaming' ? partial.status : 'error',
        error: (partial && partial.error) || message,
      });
    },
    onState: (state) => {
      if (token !== chat.token) return;
      const previous = stream.state;
      stream.state = state;
      if (previous !== state && (state !== 'live' || previous)) {
        const current = findMessage(key);
        if (current) rerender(current);
      }
    },
  });
  stream.initialLength = (msg.content || '').length;
  stream.state = null;
  chat.streams.set(key, stream);
  stream.run();
}

function finishMessage(id, final) {
  const index = chat.messages.findIndex((m) => String(m.id) === String(id));
  if (index < 0) return;
  const stick = nearBottom();
  chat.messages[index] = { ...chat.messages[index], ...final };
  chat.dirty.delete(String(id));
  rerender(chat.messages[index]);
  refreshActions();
  updateComposer();
  if (stick) scrollToBottom();
}

function replaceMessage(msg) {
  const index = chat.messages.findIndex((m) => String(m.id) === String(msg.id));
  if (index >= 0) chat.messages[index] = { ...chat.messages[index], ...msg };
}

// --- actions --------------------------------------------------------------------------

async function send() {
  const composer = $('composer');
  const text = composer.value;
  if (!text.trim() || isGenerating() || chat.sending || chat.loading) return;
  chat.sending = true;
  composer.value = '';
  autosize();
  updateComposer();
  $('message-list').querySelector('[data-testid="send-error"]')?.remove();
  const token = chat.token;
  try {
    let conv = chat.conv;
    if (!conv) {
      const body = { ...pers.newConversationFields() };
      if (models.list.length) body.model = currentModel();
      conv = await api('POST', '/api/conversations', body);
      chat.conv = conv;
      pers.onConversationCreated(conv);
      history.pushState(null, '', convPath(conv.id));
      renderChatHeader();
    }
    const body = { content: text };
    const last = chat.messages[chat.messages.length - 1];
    if (last) body.parent_id = last.id;
    const model = currentModel();
    if (model) body.model = model;
    const result = await api('POST', `/api/conversations/${encodeURIComponent(conv.id)}/messages`, body);
    if (token !== chat.token) {
      bumpConversation(conv);
      return;
    }
    chat.messages.push(result.user_message, result.assistant_message);
    const list = $('message-list');
    list.append(messageEl(result.user_message), messageEl(result.assistant_message));
    $('empty-state').hidden = true;
    refreshActions();
    scrollToBottom();
    if (result.assistant_message.status === 'streaming') attach(result.assistant_message);
    else pers.onAnswerDone(result.assistant_message); // a fast model may be done already
    bumpConversation({ ...conv, updated_at: result.user_message.created_at || conv.updated_at });
    refreshConversation(conv.id); // the server may have titled it after the first message
  } catch (err) {
    if (!composer.value) {
      composer.value = text;
      autosize();
    }
    toast(err.message);
    showInlineError(err.message);
  } finally {
    chat.sending = false;
    updateComposer();
  }
}

/** A failure that has no message to live on (the send itself failed). */
function showInlineError(message) {
  $('message-list').querySelector('[data-testid="send-error"]')?.remove();
  const box = h('div', { class: 'msg-status status-error send-error', role: 'alert', 'data-testid': 'send-error' },
    icon('alert'), h('span', { class: 'status-text' }, message));
  $('message-list').append(box);
  $('empty-state').hidden = true;
  scrollToBottom();
}

async function refreshConversation(id) {
  try {
    const conv = await api('GET', `/api/conversations/${encodeURIComponent(id)}`);
    updateConvEverywhere(conv, ['title']);
    renderConvList();
  } catch { /* not important */ }
}

function isGenerating() {
  return chat.messages.some((m) => m.role === 'assistant' && m.status === 'streaming');
}

async function stopGenerating() {
  const running = chat.messages.filter((m) => m.role === 'assistant' && m.status === 'streaming');
  $('stop').disabled = true;
  for (const msg of running) {
    try {
      const stopped = await api('POST', `/api/messages/${encodeURIComponent(msg.id)}/stop`);
      const stream = chat.streams.get(String(msg.id));
      if (stream) {
        stream.close();
        chat.streams.delete(String(msg.id));
      }
      if (stopped && stopped.id !== undefined) finishMessage(msg.id, stopped);
    } catch (err) {
      toast(`Could not stop: ${err.message}`);
    }
  }
  $('stop').disabled = false;
  updateComposer();
}

async function regenerate(msg) {
  try {
    const fresh = await api('POST', `/api/messages/${encodeURIComponent(msg.id)}/regenerate`);
    const index = chat.messages.findIndex((m) => String(m.id) === String(msg.id));
    if (index < 0 || index !== chat.messages.length - 1) {
      // Not the last message: the new branch ends here; show it as the server has it.
      await reloadMessages();
      return;
    }
    const old = chat.els.get(String(msg.id));
    chat.els.delete(String(msg.id));
    chat.messages[index] = fresh;
    const el = messageEl(fresh);
    old?.replaceWith(el);
    refreshActions();
    scrollToBottom();
    if (fresh.status === 'streaming') attach(fresh);
    else pers.onAnswerDone(fresh);
    updateComposer();
  } catch (err) {
    toast(`Could not regenerate: ${err.message}`);
  }
}

async function continueMessage(msg) {
  try {
    const updated = await api('POST', `/api/messages/${encodeURIComponent(msg.id)}/continue`);
    replaceMessage(updated && updated.id !== undefined ? updated : { ...msg, status: 'streaming' });
    const current = findMessage(msg.id);
    current.error = null;
    attach(current);
    rerender(current);
    refreshActions();
    updateComposer();
  } catch (err) {
    toast(`Could not continue: ${err.message}`);
  }
}

async function switchBranch(messageId) {
  if (!chat.conv || messageId === undefined) return;
  try {
    const conv = await api('POST', `/api/conversations/${encodeURIComponent(chat.conv.id)}/branch`, { message_id: messageId });
    if (conv && conv.id) chat.conv = conv;
  } catch (err) {
    toast(`Could not switch versions: ${err.message}`);
    return;
  }
  const anchorId = String(messageId);
  await reloadMessages();
  // Keep the switched message in view rather than jumping to the bottom.
  const el = chat.els.get(anchorId);
  if (el) el.scrollIntoView({ block: 'nearest' });
}

function startEdit(msg) {
  const el = chat.els.get(String(msg.id));
  if (!el) return;
  const input = h('textarea', { class: 'edit-input', 'data-testid': 'edit-input', 'aria-label': 'Edit message', rows: 3 });
  input.value = msg.content;
  const cancel = h('button', { class: 'btn', type: 'button', 'data-testid': 'edit-cancel' }, 'Cancel');
  const save = h('button', { class: 'btn primary', type: 'submit', 'data-testid': 'edit-save' }, 'Send');
  const form = h('form', { class: 'edit-form', 'data-testid': 'edit-form' }, input, h('div', { class: 'edit-buttons' }, cancel, save));
  const grow = () => {
    input.style.height = 'auto';
    input.style.height = `${Math.min(input.scrollHeight + 2, 400)}px`;
  };
  input.addEventListener('input', grow);
  input.addEventListener('keydown', (event) => {
    if (event.key === 'Escape') { event.preventDefault(); rerender(msg); }
    else if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) { event.preventDefault(); form.requestSubmit(); }
  });
  cancel.addEventListener('click', () => rerender(msg));
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    const content = input.value;
    if (!content.trim() || !chat.conv) return;
    save.disabled = true;
    try {
      const body = { content, parent_id: msg.parent_id ?? null };
      const model = currentModel();
      if (model) body.model = model;
      await api('POST', `/api/conversations/${encodeURIComponent(chat.conv.id)}/messages`, body);
      bumpConversation(chat.conv);
      await reloadMessages();
    } catch (err) {
      save.disabled = false;
      toast(`Could not send the edit: ${err.message}`);
    }
  });
  el.classList.add('editing');
  el.replaceChildren(form);
  grow();
  input.focus();
  input.setSelectionRange(input.value.length, input.value.length);
}

// --- scrolling and older pages ----------------------------------------------------------

const scroller = $('messages-scroll');

function nearBottom() {
  return scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 120;
}

function scrollToBottom() {
  scroller.scrollTop = scroller.scrollHeight;
  // content-visibility: messages get their real size once painted; settle on the next frame.
  requestAnimationFrame(() => {
    scroller.scrollTop = scroller.scrollHeight;
    updateJumpButton();
    if (scroller.scrollTop < 800) loadOlder();
  });
}

function updateJumpButton() {
  $('jump-bottom').hidden = nearBottom() || !chat.messages.length;
}

scroller.addEventListener('scroll', () => {
  updateJumpButton();
  if (scroller.scrollTop < 800) loadOlder();
}, { passive: true });

$('jump-bottom').addEventListener('click', () => {
  scroller.scrollTo({ top: scroller.scrollHeight, behavior: 'smooth' });
});

async function loadOlder() {
  if (!chat.hasMore || chat.loadingOlder || !chat.conv || !chat.messages.length) return;
  chat.loadingOlder = true;
  const token = chat.token;
  const oldest = chat.messages[0];
  setOlderStatus('Loading earlier messages…');
  try {
    const params = new URLSearchParams({ before: String(oldest.id), limit: String(PAGE) });
    const page = await api('GET', `/api/conversations/${encodeURIComponent(chat.conv.id)}/messages?${params}`);
    if (token !== chat.token) return;
    const older = (page.data || []).filter((m) => !chat.els.has(String(m.id)));
    chat.hasMore = Boolean(page.has_more) && older.length > 0;
    // Keep what the user is looking at in place while content is added above it. Chrome's
    // scroll anchoring does it by itself unless we are at the very top (scrollTop 0); the
    // correction below covers that case and is a no-op otherwise.
    const anchor = firstVisibleMessage();
    const before = anchor ? anchor.getBoundingClientRect().top : 0;
    const frag = document.createDocumentFragment();
    for (const msg of older) frag.append(messageEl(msg));
    chat.messages = [...older, ...chat.messages];
    $('message-list').prepend(frag);
    if (anchor) scroller.scrollTop += anchor.getBoundingClientRect().top - before;
    setOlderStatus('');
  } catch (err) {
    if (token === chat.token) setOlderStatus(`Could not load earlier messages: ${err.message}`);
  } finally {
    if (token === chat.token) chat.loadingOlder = false;
  }
  // A short page may still leave us near the top.
  if (token === chat.token && chat.hasMore && scroller.scrollTop < 800) requestAnimationFrame(() => loadOlder());
}

function firstVisibleMessage() {
  const top = scroller.getBoundingClientRect().top;
  for (const el of $('message-list').children) {
    if (el.getBoundingClientRect().bottom > top) return el;
  }
  return $('message-list').firstElementChild;
}

// --- composer ---------------------------------------------------------------------------

const composer = $('composer');

function autosize() {
  composer.style.height = 'auto';
  composer.style.height = `${Math.min(composer.scrollHeight, 240)}px`;
}

function updateComposer() {
  const generating = isGenerating();
  $('send').hidden = generating;
  $('stop').hidden = !generating;
  $('send').disabled = !composer.value.trim() || chat.sending || chat.loading;
  document.body.dataset.generating = generating ? 'true' : 'false';
}

composer.addEventListener('input', () => {
  autosize();
  updateComposer();
});

composer.addEventListener('keydown', (event) => {
  if (event.key === 'Enter' && !event.shiftKey && !event.isComposing && !event.altKey && !event.ctrlKey && !event.metaKey) {
    event.preventDefault();
    if (!isGenerating()) send();
  }
});

$('composer-form').addEventListener('submit', (event) => {
  event.preventDefault();
  send();
});

$('stop').addEventListener('click', () => stopGenerating());

// ---------------------------------------------------------------------------------------
// Dialogs

function confirmDialog(title, text) {
  const dialog = $('confirm');
  $('confirm-title').textContent = title;
  $('confirm-text').textContent = text;
  dialog.returnValue = '';
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener('close', () => resolve(dialog.returnValue === 'ok'), { once: true });
  });
}

const settingsDialog = $('settings');

$('open-settings').addEventListener('click', () => openSettings());
settingsDialog.querySelector('[data-close]').addEventListener('click', () => settingsDialog.close());
settingsDialog.addEventListener('click', (event) => {
  if (event.target === settingsDialog) settingsDialog.close(); // a click on the backdrop
});

function settingsError(message) {
  const el = $('settings-error');
  el.textContent = message || '';
  el.hidden = !message;
}

async function openSettings() {
  const user = session.user;
  $('settings-username').textContent = user.username;
  $('settings-role').textContent = user.role;
  $('key-created').hidden = true;
  $('key-value').textContent = '';
  settingsError('');
  $('admin-section').hidden = user.role !== 'admin';
  settingsDialog.showModal();
  closeSidebar();
  loadKeys();
  if (user.role === 'admin') {
    try {
      const settings = await api('GET', '/api/admin/settings');
      $('signup-toggle').checked = Boolean(settings.signup_open);
    } catch (err) {
      settingsError(err.message);
    }
    loadSafetyStats();
  }
}

// Per model: how often the safety layer blocked a request, asked for caution or recovered from a refusal.
async function loadSafetyStats() {
  const status = $('safety-status');
  const table = $('safety-table');
  try {
    const stats = await api('GET', '/api/admin/safety?days=7');
    const rows = stats.data || [];
    status.textContent = stats.enabled
      ? (rows.length ? '' : 'No answers yet.')
      : 'The safety layer is off (SALON_SAFETY_ENABLED=true turns it on).';
    const body = table.querySelector('tbody');
    body.replaceChildren(...rows.map((row) => {
      const tr = document.createElement('tr');
      const pct = (n) => (row.answers ? `${n} (${((100 * n) / row.answers).toFixed(1)} %)` : '0');
      for (const value of [row.model, String(row.answers), pct(row.blocked), pct(row.caution), pct(row.recovered), pct(row.recovery_failed), pct(row.refusal_kept || 0)]) {
        const td = document.createElement('td');
        td.textContent = value;
        tr.append(td);
      }
      return tr;
    }));
    table.hidden = rows.length === 0;
  } catch (err) {
    status.textContent = `Could not load safety statistics: ${err.message}`;
  }
}

async function loadKeys() {
  try {
    const data = await api('GET', '/api/keys');
    renderKeys(data.data || []);
  } catch (err) {
    settingsError(`Could not load API keys: ${err.message}`);
  }
}

function renderKeys(keys) {
  $('key-empty').hidden = keys.length > 0;
  $('key-list').replaceChildren(...keys.map((key) => h('li', { class: 'key-item', 'data-testid': 'key-item', 'data-id': key.id },
    h('span', { class: 'key-info' },
      h('span', { class: 'key-name', 'data-testid': 'key-item-name' }, key.name),
      h('span', { class: 'muted small' },
        h('code', {}, `${key.prefix}…`),
        ` · created ${formatDate(key.created_at)}`,
        key.last_used_at ? ` · last used ${formatDate(key.last_used_at)}` : ' · never used')),
    h('button', {
      class: 'icon-btn', type: 'button', 'data-testid': 'key-delete', title: 'Delete key', 'aria-label': `Delete key ${key.name}`,
      onclick: async () => {
        try {
          await api('DELETE', `/api/keys/${encodeURIComponent(key.id)}`);
          loadKeys();
        } catch (err) {
          settingsError(`Could not delete the key: ${err.message}`);
        }
      },
    }, icon('trash')))));
}

$('key-form').addEventListener('submit', async (event) => {
  event.preventDefault();
  const name = $('key-name').value.trim();
  if (!name) return;
  settingsError('');
  try {
    const created = await api('POST', '/api/keys', { name });
    $('key-name').value = '';
    $('key-value').textContent = created.key;
    $('key-created').hidden = false;
    loadKeys();
  } catch (err) {
    settingsError(`Could not create the key: ${err.message}`);
  }
});

$('key-copy').addEventListener('click', async () => {
  const ok = await copyText($('key-value').textContent);
  $('key-copy').textContent = ok ? 'Copied' : 'Copy failed';
  setTimeout(() => { $('key-copy').textContent = 'Copy'; }, 1500);
});

$('signup-toggle').addEventListener('change', async () => {
  const toggle = $('signup-toggle');
  const wanted = toggle.checked;
  toggle.disabled = true;
  settingsError('');
  try {
    const settings = await api('PATCH', '/api/admin/settings', { signup_open: wanted });
    toggle.checked = Boolean(settings.signup_open);
  } catch (err) {
    toggle.checked = !wanted;
    settingsError(`Could not change the setting: ${err.message}`);
  } finally {
    toggle.disabled = false;
  }
});

// ---------------------------------------------------------------------------------------
// Personalization, memory and temporary chats (personalization.js)

const pers = setupPersonalization({
  $, h, icon, api, toast, debounce, formatDate, sleep, copyButton, confirmDialog,
  chat, currentModel, navigate, reloadMessages, rerender, findMessage, closeSidebar,
});

// ---------------------------------------------------------------------------------------

start();
