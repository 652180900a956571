// Personalization in the web app: the settings dialog, per-chat overrides, the instruction
// stack preview, the memory manager, temporary chats, and what the chat shows about memory
// and about how an answer followed the user's settings. The HTTP contract is docs/api.md.
//
// Same safety rule as app.js: text from the server, the user or a model reaches the page
// only as text nodes (textContent), never as HTML.
//
// app.js owns the chat; it hands this module its helpers and calls the hooks returned by
// setupPersonalization (see the end of this file).

const LEVELS = [['less', 'Less'], ['default', 'Default'], ['more', 'More']];
const LENGTHS = [['concise', 'Concise'], ['default', 'Default'], ['detailed', 'Detailed']];
const TRAITS = ['warm', 'enthusiastic', 'headers_lists', 'emoji'];
const LEVEL_NAMES = Object.fromEntries(LEVELS);
const LENGTH_NAMES = Object.fromEntries(LENGTHS);
const SOURCE_NAMES = {
  operator: 'Server',
  account: 'Your settings',
  persona: 'Persona',
  conversation: 'This chat',
  memory: 'Memory',
  history: 'Chat history',
  // where a checked rule comes from
  personality: 'Personality',
  characteristics: 'Characteristics',
  length: 'Length',
  nickname: 'Nickname',
  instructions: 'Your instructions',
  message: 'Your message',
};
const KIND_NAMES = { fact: 'Fact', preference: 'Preference', instruction: 'Instruction', event: 'Event' };
const STATUS_NAMES = { superseded: 'Replaced', deleted: 'Deleted' };
// When to look for memories saved from a message after its answer finished (ms after the
// answer): saving runs in the background, an explicit "remember that" within about a second.
const CHIP_POLL_MS = [0, 1500, 5000];
const UNDO_TOAST_MS = 10000;

export function setupPersonalization(app) {
  const { $, h, api, toast, debounce, formatDate, chat } = app;

  const state = {
    settings: null, // the last GET/PUT /api/personalization answer
    personas: [],
    temporaryNext: false, // the chat about to be started is temporary
    pending: null, // per-chat settings picked before the chat exists
    chips: new Map(), // user message id → [{action, memory, previous, undone}]
    polling: new Set(), // user message ids being watched for memories
    revisions: new Set(), // answers known to be revisions (also while they stream)
    expanded: new Set(), // answers whose list of checks is open
  };

  // -------------------------------------------------------------------------------------
  // Shared

  async function loadSettings() {
    const data = await api('GET', '/api/personalization');
    state.settings = data;
    return data;
  }

  function personalityName(id) {
    const found = (state.settings?.personalities || []).find((p) => p.id === id);
    return found ? found.name : id;
  }

  function setError(el, message) {
    el.textContent = message || '';
    el.hidden = !message;
  }

  function options(select, pairs, value) {
    select.replaceChildren(...pairs.map(([v, label]) => h('option', { value: v }, label)));
    if (value !== undefined && value !== null) select.value = value;
  }

  /** <option>s of the personalities: the presets, then the user's personas. */
  function personalityOptions(select, value, first = null) {
    const all = state.settings?.personalities || [];
    const presets = all.filter((p) => !p.custom);
    const personas = all.filter((p) => p.custom);
    const children = [];
    if (first) children.push(h('option', { value: first[0] }, first[1]));
    for (const p of presets) children.push(h('option', { value: p.id }, p.name));
    if (personas.length) {
      children.push(h('optgroup', { label: 'Your personas' },
        personas.map((p) => h('option', { value: p.id }, p.name))));
    }
    if (value && !all.some((p) => p.id === value) && !(first && first[0] === value)) {
      children.push(h('option', { value }, `${value} (no longer exists)`));
    }
    select.replaceChildren(...children);
    select.value = value ?? (first ? first[0] : 'default');
  }

  function isTemporary() {
    return chat.conv ? Boolean(chat.conv.temporary) : state.temporaryNext;
  }

  function closeOthers() {
    for (const id of ['settings', 'personalization', 'memory', 'preview']) {
      const dialog = $(id);
      if (dialog.open) dialog.close();
    }
  }

  function wireDialog(dialog) {
    for (const button of dialog.querySelectorAll('[data-close]')) {
      button.addEventListener('click', () => dialog.close());
    }
    dialog.addEventListener('click', (event) => {
      if (event.target === dialog) dialog.close(); // a click on the backdrop
    });
  }

  // -------------------------------------------------------------------------------------
  // Personalization dialog

  const pDialog = $('personalization');
  wireDialog(pDialog);
  const pError = $('personalization-error');
  const counters = [
    ['about-more', 'about-more-count'],
    ['how-to-respond', 'how-to-respond-count'],
  ];

  $('open-personalization').addEventListener('click', () => openPersonalization());
  $('personalization-manage-memory').addEventListener('click', () => openMemory());

  for (const select of pDialog.querySelectorAll('select[data-trait]')) options(select, LEVELS, 'default');
  options($('length-select'), LENGTHS, 'default');

  function updateCounters() {
    const limit = state.settings?.limits?.free_text || 1500;
    for (const [fieldId, counterId] of counters) {
      const length = $(fieldId).value.length;
      const counter = $(counterId);
      counter.textContent = `${length} / ${limit}`;
      counter.classList.toggle('over', length > limit);
      counter.classList.toggle('near', length <= limit && length > limit * 0.9);
    }
  }
  for (const [fieldId] of counters) $(fieldId).addEventListener('input', updateCounters);

  function updateSummary() {
    const id = $('personality-select').value;
    const found = (state.settings?.personalities || []).find((p) => p.id === id);
    $('personality-summary').textContent = found ? found.summary : '';
  }
  $('personality-select').addEventListener('change', updateSummary);

  async function openPersonalization() {
    closeOthers();
    app.closeSidebar();
    setError(pError, '');
    $('personalization-saved').hidden = true;
    pDialog.showModal();
    pDialog.dataset.state = 'loading';
    try {
      const [data] = await Promise.all([loadSettings(), loadPersonas()]);
      fillForm(data.profile);
      pDialog.dataset.state = 'ready';
    } catch (err) {
      pDialog.dataset.state = 'error';
      setError(pError, `Could not load your personalization: ${err.message}`);
    }
  }

  function fillForm(profile) {
    const limit = state.settings?.limits?.free_text || 1500;
    personalityOptions($('personality-select'), profile.personality);
    for (const trait of TRAITS) $(`trait-${trait}`).value = profile.characteristics?.[trait] || 'default';
    $('length-select').value = profile.length || 'default';
    $('about-nickname').value = profile.about?.nickname || '';
    $('about-occupation').value = profile.about?.occupation || '';
    $('about-more').value = profile.about?.more || '';
    $('how-to-respond').value = profile.how_to_respond || '';
    $('about-more').maxLength = limit;
    $('how-to-respond').maxLength = limit;
    $('memory-enabled').checked = Boolean(profile.memory_enabled);
    $('reference-history').checked = Boolean(profile.reference_history);
    updateCounters();
    updateSummary();
  }

  function formProfile() {
    const characteristics = {};
    for (const trait of TRAITS) characteristics[trait] = $(`trait-${trait}`).value;
    return {
      personality: $('personality-select').value,
      characteristics,
      length: $('length-select').value,
      about: {
        nickname: $('about-nickname').value.trim(),
        occupation: $('about-occupation').value.trim(),
        more: $('about-more').value.trim(),
      },
      how_to_respond: $('how-to-respond').value.trim(),
      memory_enabled: $('memory-enabled').checked,
      reference_history: $('reference-history').checked,
    };
  }

  let savedTimer = 0;
  $('personalization-save').addEventListener('click', async () => {
    const button = $('personalization-save');
    const saved = $('personalization-saved');
    setError(pError, '');
    saved.hidden = true;
    button.disabled = true;
    try {
      const data = await api('PUT', '/api/personalization', formProfile());
      state.settings = data;
      fillForm(data.profile);
      saved.hidden = false;
      clearTimeout(savedTimer);
      savedTimer = setTimeout(() => { saved.hidden = true; }, 4000);
    } catch (err) {
      setError(pError, `Could not save: ${err.message}`);
    } finally {
      button.disabled = false;
    }
  });

  // -- personas --

  async function loadPersonas() {
    const data = await api('GET', '/api/personas');
    state.personas = data.data || [];
    renderPersonas();
  }

  function renderPersonas() {
    $('persona-empty').hidden = state.personas.length > 0;
    $('persona-list').replaceChildren(...state.personas.map((persona) => h('li', {
      class: 'key-item persona-item', 'data-testid': 'persona-item', 'data-id': persona.id,
    },
    h('span', { class: 'key-info' },
      h('span', { class: 'key-name', 'data-testid': 'persona-item-name' }, persona.name),
      h('span', { class: 'muted small clamp' }, persona.description)),
    h('button', {
      class: 'icon-btn', type: 'button', 'data-testid': 'persona-edit', title: 'Edit persona',
      'aria-label': `Edit persona ${persona.name}`, onclick: () => editPersona(persona),
    }, app.icon('edit')),
    h('button', {
      class: 'icon-btn', type: 'button', 'data-testid': 'persona-delete', title: 'Delete persona',
      'aria-label': `Delete persona ${persona.name}`, onclick: () => deletePersona(persona),
    }, app.icon('trash')))));
  }

  /** Personas changed: refresh the list of personalities, keeping unsaved choices. */
  async function refreshPersonalities() {
    const chosen = $('personality-select').value;
    const data = await api('GET', '/api/personalization');
    state.settings = { ...data, profile: state.settings?.profile || data.profile };
    const exists = (data.personalities || []).some((p) => p.id === chosen);
    personalityOptions($('personality-select'), exists ? chosen : data.profile.personality);
    updateSummary();
  }

  async function deletePersona(persona) {
    const ok = await app.confirmDialog('Delete this persona?', `“${persona.name}” will be deleted. Chats that use it go back to your default personality.`);
    if (!ok) return;
    setError(pError, '');
    try {
      await api('DELETE', `/api/personas/${encodeURIComponent(persona.id)}`);
    } catch (err) {
      if (err.status !== 404) {
        setError(pError, `Could not delete the persona: ${err.message}`);
        return;
      }
    }
    try {
      await Promise.all([loadPersonas(), refreshPersonalities()]);
    } catch (err) {
      setError(pError, err.message);
    }
  }

  // Editing puts the persona in the form; saving then replaces it (PUT) instead of creating.
  let editing = null;

  function editPersona(persona) {
    editing = persona;
    $('persona-name').value = persona.name;
    $('persona-description').value = persona.description;
    $('persona-create').textContent = 'Save persona';
    $('persona-name').focus();
  }

  function stopEditing() {
    editing = null;
    $('persona-create').textContent = 'Create persona';
  }

  $('persona-form').addEventListener('submit', async (event) => {
    event.preventDefault();
    const name = $('persona-name').value.trim();
    const description = $('persona-description').value.trim();
    setError(pError, '');
    if (!name || !description) {
      setError(pError, 'A persona needs a name and a description.');
      return;
    }
    const button = $('persona-create');
    button.disabled = true;
    try {
      if (editing) {
        await api('PUT', `/api/personas/${encodeURIComponent(editing.id)}`, { name, description });
      } else {
        await api('POST', '/api/personas', { name, description });
      }
      $('persona-name').value = '';
      $('persona-description').value = '';
      stopEditing();
      await Promise.all([loadPersonas(), refreshPersonalities()]);
    } catch (err) {
      setError(pError, `Could not save the persona: ${err.message}`);
    } finally {
      button.disabled = false;
    }
  });

  // -------------------------------------------------------------------------------------
  // Per-chat settings

  const panel = $('chat-settings-panel');
  const panelButton = $('chat-settings');

  function chatOverrides() {
    return (chat.conv ? chat.conv.settings : state.pending) || {};
  }

  function hasOverrides(settings) {
    if (!settings) return false;
    if (settings.personality || settings.length || settings.how_to_respond) return true;
    return TRAITS.some((t) => settings.characteristics && settings.characteristics[t]);
  }

  function fillPanel() {
    const profile = state.settings?.profile;
    const current = chatOverrides();
    const account = profile ? personalityName(profile.personality) : 'your settings';
    personalityOptions($('chat-personality'), current.personality || '', ['', `As in your settings (${account})`]);
    for (const trait of TRAITS) {
      const inherited = LEVEL_NAMES[profile?.characteristics?.[trait]] || 'Default';
      options($(`chat-trait-${trait}`), [['', `Inherit (${inherited})`], ...LEVELS], current.characteristics?.[trait] || '');
    }
    const inheritedLength = LENGTH_NAMES[profile?.length] || 'Default';
    options($('chat-length'), [['', `Inherit (${inheritedLength})`], ...LENGTHS], current.length || '');
  }

  function panelSettings() {
    const settings = {};
    if ($('chat-personality').value) settings.personality = $('chat-personality').value;
    const characteristics = {};
    for (const trait of TRAITS) {
      const value = $(`chat-trait-${trait}`).value;
      if (value) characteristics[trait] = value;
    }
    if (Object.keys(characteristics).length) settings.characteristics = characteristics;
    if ($('chat-length').value) settings.length = $('chat-length').value;
    // A how-to-respond override set through the API is kept.
    const keep = chatOverrides().how_to_respond;
    if (keep) settings.how_to_respond = keep;
    return settings;
  }

  async function openPanel() {
    panel.hidden = false;
    panelButton.setAttribute('aria-expanded', 'true');
    $('chat-settings-status').textContent = '';
    panel.dataset.state = 'loading';
    try {
      await loadSettings(); // fresh: the account settings may have changed elsewhere
    } catch (err) {
      $('chat-settings-status').textContent = `Could not load your settings: ${err.message}`;
    }
    if (panel.hidden) return;
    fillPanel();
    panel.dataset.state = 'ready';
    $('chat-personality').focus();
  }

  function closePanel(focusButton = false) {
    if (panel.hidden) return;
    panel.hidden = true;
    panelButton.setAttribute('aria-expanded', 'false');
    if (focusButton) panelButton.focus();
  }

  panelButton.addEventListener('click', () => {
    if (panel.hidden) openPanel();
    else closePanel();
  });
  document.addEventListener('keydown', (event) => {
    if (event.key === 'Escape' && !panel.hidden && !document.querySelector('dialog[open]')) {
      event.preventDefault();
      closePanel(panel.contains(document.activeElement));
    }
  });
  document.addEventListener('click', (event) => {
    if (!panel.hidden && !event.target.closest('.chat-settings-wrap')) closePanel();
  });

  async function applyChatSettings(settings, doneText) {
    const status = $('chat-settings-status');
    if (!chat.conv) {
      state.pending = hasOverrides(settings) ? settings : null;
      status.textContent = hasOverrides(settings) ? 'Applies to this chat once you send the first message.' : doneText;
      renderHeader();
      return true;
    }
    const conv = chat.conv;
    try {
      const updated = await api('PATCH', `/api/conversations/${encodeURIComponent(conv.id)}`, { settings });
      conv.settings = (updated && updated.settings) || settings;
      if (chat.conv === conv) {
        status.textContent = doneText;
        renderHeader();
      }
      return true;
    } catch (err) {
      status.textContent = `Could not save: ${err.message}`;
      return false;
    }
  }

  $('chat-settings-save').addEventListener('click', async () => {
    const button = $('chat-settings-save');
    button.disabled = true;
    await applyChatSettings(panelSettings(), 'Saved for this chat.');
    button.disabled = false;
  });

  $('chat-settings-reset').addEventListener('click', async () => {
    const button = $('chat-settings-reset');
    button.disabled = true;
    if (await applyChatSettings({}, 'This chat follows your settings.')) fillPanel();
    button.disabled = false;
  });

  // -------------------------------------------------------------------------------------
  // Temporary chat

  $('temporary-chat').addEventListener('click', () => {
    if (chat.conv) {
      const wasTemporary = Boolean(chat.conv.temporary);
      app.navigate('/');
      state.temporaryNext = !wasTemporary;
    } else {
      state.temporaryNext = !state.temporaryNext;
    }
    renderHeader();
    $('composer').focus();
  });

  function renderHeader() {
    const temporary = isTemporary();
    $('temporary-banner').hidden = !temporary;
    const button = $('temporary-chat');
    button.setAttribute('aria-pressed', temporary ? 'true' : 'false');
    button.title = temporary ? 'Leave the temporary chat' : 'Start a temporary chat';
    document.body.dataset.temporary = temporary ? 'true' : 'false';
    const active = hasOverrides(chatOverrides());
    panelButton.dataset.active = active ? 'true' : 'false';
    panelButton.title = active ? 'Settings for this chat (changed)' : 'Settings for this chat';
  }

  // -------------------------------------------------------------------------------------
  // Preview: the instruction stack and the exact messages for the next turn

  const previewDialog = $('preview');
  wireDialog(previewDialog);
  let previewToken = 0;

  $('open-preview').addEventListener('click', () => openPreview());

  async function openPreview() {
    closePanel();
    const token = ++previewToken;
    setError($('preview-error'), '');
    $('preview-stack').replaceChildren();
    $('preview-rules').replaceChildren();
    $('preview-messages').replaceChildren();
    const draft = $('composer').value;
    const notes = [];
    if (!draft.trim()) notes.push('Your draft is empty; type a message first to see it in place.');
    if (isTemporary()) notes.push('Temporary chat: nothing from it is saved to memory.');
    $('preview-status').textContent = 'Loading…';
    previewDialog.dataset.state = 'loading';
    if (!previewDialog.open) previewDialog.showModal();
    const body = { conversation_id: chat.conv ? String(chat.conv.id) : null, content: draft };
    if (!chat.conv) Object.assign(body, newChatFields());
    const model = app.currentModel();
    if (model) body.model = model;
    let data;
    try {
      data = await api('POST', '/api/personalization/preview', body);
    } catch (err) {
      if (token !== previewToken) return;
      $('preview-status').textContent = '';
      previewDialog.dataset.state = 'error';
      setError($('preview-error'), `Could not build the preview: ${err.message}`);
      return;
    }
    if (token !== previewToken) return;
    $('preview-status').textContent = notes.join(' ');
    renderStack(data.layers || []);
    renderRules(data.rules || []);
    renderPreviewMessages(data.messages || []);
    previewDialog.dataset.state = 'ready';
  }

  // A chat not started yet: what it will be created with, so the preview matches it.
  function newChatFields() {
    const fields = {};
    if (state.temporaryNext) fields.temporary = true;
    if (state.pending) fields.settings = state.pending;
    return fields;
  }

  function sourceBadge(source, testid) {
    return h('span', { class: `badge source source-${source}`, 'data-testid': testid, 'data-source': source },
      SOURCE_NAMES[source] || source);
  }

  function renderStack(layers) {
    const list = $('preview-stack');
    if (!layers.length) {
      list.replaceChildren(h('li', { class: 'muted small' }, 'No instructions: the model gets the conversation alone.'));
      return;
    }
    list.replaceChildren(...layers.map((layer, index) => {
      const withheld = Boolean(layer.withheld);
      return h('li', {
        class: `stack-layer${withheld ? ' withheld' : ''}`, 'data-testid': 'stack-layer',
        'data-source': layer.source, 'data-layer-id': layer.id, 'data-withheld': withheld ? 'true' : 'false',
      },
      h('div', { class: 'layer-head' },
        h('span', { class: 'layer-index', 'aria-hidden': 'true' }, String(index + 1)),
        h('strong', { class: 'layer-title', 'data-testid': 'layer-title' }, layer.title || layer.id),
        sourceBadge(layer.source, 'layer-source')),
      withheld
        ? h('p', { class: 'layer-withheld', 'data-testid': 'layer-withheld' }, `Not sent to this model: ${layer.withheld}`)
        : null,
      layer.text ? h('div', { class: 'layer-text', 'data-testid': 'layer-text' }, layer.text) : null);
    }));
  }

  function renderRules(rules) {
    const list = $('preview-rules');
    if (!rules.length) {
      list.replaceChildren(h('li', { class: 'muted small', 'data-testid': 'preview-no-rules' }, 'Nothing to check with these settings.'));
      return;
    }
    list.replaceChildren(...rules.map((rule) => h('li', {
      class: 'rule', 'data-testid': 'preview-rule', 'data-kind': rule.kind, 'data-source': rule.source,
    }, h('span', { class: 'rule-text' }, rule.rule), sourceBadge(rule.source, 'rule-source'))));
  }

  function renderPreviewMessages(messages) {
    const box = $('preview-messages');
    const all = messages.map((m) => `${m.role}:\n${m.content}`).join('\n\n');
    box.replaceChildren(
      h('div', { class: 'preview-tools' },
        app.copyButton(() => all, { testid: 'preview-copy', label: 'Copy all', withText: true, cls: 'code-copy' })),
      ...messages.map((m) => h('div', { class: 'preview-message', 'data-testid': 'preview-message', 'data-role': m.role },
        h('div', { class: 'preview-role' }, m.role),
        h('pre', { class: 'preview-text' }, m.content))));
  }

  // -------------------------------------------------------------------------------------
  // Memory manager

  const mDialog = $('memory');
  wireDialog(mDialog);
  const mError = $('memory-error');
  let listToken = 0;

  $('open-memory').addEventListener('click', () => openMemory());

  async function openMemory() {
    closeOthers();
    app.closeSidebar();
    setError(mError, '');
    mDialog.showModal();
    const [settings] = await Promise.allSettled([loadSettings(), loadMemories()]);
    if (settings.status === 'fulfilled') {
      $('memory-pause').checked = !settings.value.profile.memory_enabled;
    } else {
      setError(mError, `Could not load your settings: ${settings.reason.message}`);
    }
  }

  async function loadMemories() {
    const token = ++listToken;
    const params = new URLSearchParams();
    const q = $('memory-search').value.trim();
    if (q) params.set('q', q);
    if ($('memory-history').checked) params.set('history', '1');
    $('memory-list').dataset.state = 'loading';
    try {
      const data = await api('GET', `/api/memory?${params}`);
      if (token !== listToken) return;
      renderMemories(data.data || [], q);
    } catch (err) {
      if (token !== listToken) return;
      $('memory-list').dataset.state = 'error';
      setError(mError, `Could not load your memories: ${err.message}`);
    }
  }

  function renderMemories(items, q) {
    const list = $('memory-list');
    list.replaceChildren(...items.map((memory) => memoryItem(memory)));
    list.dataset.state = 'ready';
    const empty = $('memory-empty');
    empty.textContent = q ? 'No memories match.' : 'No memories yet. Salon saves what you ask it to remember, and facts you share.';
    empty.hidden = items.length > 0;
  }

  function memoryItem(memory) {
    const current = memory.status === 'current';
    const li = h('li', {
      class: `memory-item status-${memory.status}`, 'data-testid': 'memory-item',
      'data-id': memory.id, 'data-status': memory.status,
    });
    const meta = h('span', { class: 'memory-meta muted small' },
      h('span', { class: 'badge', 'data-testid': 'memory-kind' }, KIND_NAMES[memory.kind] || memory.kind),
      STATUS_NAMES[memory.status]
        ? h('span', { class: 'badge status', 'data-testid': 'memory-status' }, STATUS_NAMES[memory.status])
        : null,
      h('span', { 'data-testid': 'memory-date' }, formatDate(memory.updated_at || memory.created_at)));
    if (memory.conversation_id) {
      const link = h('a', { href: `/c/${encodeURIComponent(memory.conversation_id)}`, class: 'memory-source' }, 'from a chat');
      link.addEventListener('click', (event) => {
        if (event.button !== 0 || event.metaKey || event.ctrlKey || event.shiftKey || event.altKey) return;
        event.preventDefault();
        mDialog.close();
        app.navigate(`/c/${encodeURIComponent(memory.conversation_id)}`);
      });
      meta.append(link);
    }
    const main = h('div', { class: 'memory-main' },
      h('p', { class: 'memory-text', 'data-testid': 'memory-text' }, memory.text), meta);
    const actions = h('div', { class: 'memory-actions' });
    if (current) {
      actions.append(
        h('button', {
          class: 'icon-btn', type: 'button', 'data-testid': 'memory-edit', title: 'Edit',
          'aria-label': 'Edit memory', onclick: () => startMemoryEdit(li, memory),
        }, app.icon('edit')),
        h('button', {
          class: 'icon-btn', type: 'button', 'data-testid': 'memory-delete', title: 'Delete',
          'aria-label': 'Delete memory', onclick: () => deleteMemory(memory),
        }, app.icon('trash')));
    }
    li.append(main, actions);
    return li;
  }

  function startMemoryEdit(li, memory) {
    const limit = state.settings?.limits?.memory || 500;
    const input = h('textarea', {
      class: 'memory-edit-input', rows: 2, maxlength: limit, 'aria-label': 'Memory text', 'data-testid': 'memory-edit-input',
    });
    input.value = memory.text;
    const cancel = h('button', { class: 'btn small', type: 'button', 'data-testid': 'memory-edit-cancel' }, 'Cancel');
    const save = h('button', { class: 'btn small primary', type: 'submit', 'data-testid': 'memory-edit-save' }, 'Save');
    const form = h('form', { class: 'memory-edit-form', 'data-testid': 'memory-edit-form' },
      input, h('div', { class: 'edit-buttons' }, cancel, save));
    input.addEventListener('keydown', (event) => {
      if (event.key === 'Escape') {
        event.preventDefault();
        event.stopPropagation(); // not the dialog's Escape
        loadMemories();
      } else if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        form.requestSubmit();
      }
    });
    cancel.addEventListener('click', () => loadMemories());
    form.addEventListener('submit', async (event) => {
      event.preventDefault();
      const text = input.value.trim();
      if (!text) return;
      if (text === memory.text) { loadMemories(); return; }
      save.disabled = true;
      setError(mError, '');
      try {
        await api('PATCH', `/api/memory/${encodeURIComponent(memory.id)}`, { text });
        await loadMemories();
      } catch (err) {
        save.disabled = false;
        setError(mError, `Could not save the memory: ${err.message}`);
      }
    });
    li.replaceChildren(form);
    input.focus();
    input.setSelectionRange(input.value.length, input.value.length);
  }

  async function deleteMemory(memory) {
    setError(mError, '');
    try {
      await api('DELETE', `/api/memory/${encodeURIComponent(memory.id)}`);
    } catch (err) {
      setError(mError, `Could not delete the memory: ${err.message}`);
      return;
    }
    await loadMemories();
    undoToast('Memory deleted.', async () => {
      await api('POST', `/api/memory/${encodeURIComponent(memory.id)}/restore`);
      if (mDialog.open) await loadMemories();
    });
  }

  /** A toast with an Undo button; `undo` is awaited, its failure shown. */
  function undoToast(message, undo) {
    for (const old of document.querySelectorAll('[data-testid="undo-toast"]')) old.remove();
    const button = h('button', { class: 'btn small', type: 'button', 'data-testid': 'undo' }, 'Undo');
    const el = h('div', { class: 'toast info undo-toast', role: 'status', 'data-testid': 'undo-toast' },
      h('span', { class: 'toast-text' }, message), button,
      h('button', { class: 'toast-close', type: 'button', 'aria-label': 'Dismiss', onclick: () => el.remove() }, '×'));
    button.addEventListener('click', async () => {
      button.disabled = true;
      try {
        await undo();
        el.remove();
      } catch (err) {
        button.disabled = false;
        toast(`Could not undo: ${err.message}`);
      }
    });
    // The toast lives in the top layer while a modal dialog is open, or it could not be clicked.
    (mDialog.open ? mDialog : $('toasts')).append(el);
    setTimeout(() => el.remove(), UNDO_TOAST_MS);
    return el;
  }

  // An undo toast shown inside the dialog stays available once the dialog is closed.
  mDialog.addEventListener('close', () => {
    for (const el of mDialog.querySelectorAll('.undo-toast')) $('toasts').append(el);
  });

  $('memory-search').addEventListener('input', debounce(() => loadMemories(), 250));
  $('memory-history').addEventListener('change', () => loadMemories());

  $('memory-add-form').addEventListener('submit', async (event) => {
    event.preventDefault();
    const text = $('memory-add-text').value.trim();
    if (!text) return;
    const button = $('memory-add');
    button.disabled = true;
    setError(mError, '');
    try {
      await api('POST', '/api/memory', { text, kind: $('memory-add-kind').value });
      $('memory-add-text').value = '';
      await loadMemories();
    } catch (err) {
      setError(mError, `Could not add the memory: ${err.message}`);
    } finally {
      button.disabled = false;
    }
  });

  $('memory-pause').addEventListener('change', async () => {
    const toggle = $('memory-pause');
    const paused = toggle.checked;
    toggle.disabled = true;
    setError(mError, '');
    try {
      const data = await api('PUT', '/api/personalization', { memory_enabled: !paused });
      state.settings = data;
      toggle.checked = !data.profile.memory_enabled;
    } catch (err) {
      toggle.checked = !paused;
      setError(mError, `Could not change the setting: ${err.message}`);
    } finally {
      toggle.disabled = false;
    }
  });

  // -------------------------------------------------------------------------------------
  // In the chat: memory chips under user messages, notes under answers

  async function watchMemories(userMessageId, delays = CHIP_POLL_MS) {
    const key = String(userMessageId);
    if (state.polling.has(key)) return;
    state.polling.add(key);
    const started = performance.now();
    try {
      for (const delay of delays) {
        const wait = delay - (performance.now() - started);
        if (wait > 0) await app.sleep(wait);
        let data;
        try {
          data = await api('GET', `/api/messages/${encodeURIComponent(key)}/memories`);
        } catch {
          continue; // a hiccup, or not ours any more: try again on the next round
        }
        const changes = data.data || [];
        if (changes.length) {
          setChips(key, changes);
          return;
        }
      }
    } finally {
      state.polling.delete(key);
    }
  }

  function setChips(key, changes) {
    const known = new Map((state.chips.get(key) || []).map((c) => [`${c.action}:${c.memory.id}`, c]));
    state.chips.set(key, changes.map((c) => known.get(`${c.action}:${c.memory.id}`) || { ...c, undone: false }));
    repaintMessage(key);
  }

  function repaintMessage(key) {
    const msg = app.findMessage(key);
    const el = chat.els.get(key);
    if (msg && el && !el.classList.contains('editing')) app.rerender(msg);
  }

  function chipText(change) {
    if (change.undone) return change.action === 'forgotten' ? 'Undone — memory restored' : 'Undone — not saved to memory';
    const prefix = change.action === 'forgotten' ? 'Forgot' : 'Memory updated';
    return `${prefix}: ${change.memory.text}`;
  }

  function memoryChips(key) {
    const changes = state.chips.get(key);
    if (!changes || !changes.length) return null;
    return h('div', { class: 'memory-chips' }, changes.map((change) => {
      const chip = h('div', {
        class: `memory-chip${change.undone ? ' undone' : ''}`, 'data-testid': 'memory-chip',
        'data-action': change.action, 'data-state': change.undone ? 'undone' : 'done', 'data-memory-id': change.memory.id,
      },
      h('span', { class: 'memory-chip-icon', 'aria-hidden': 'true' }, change.undone ? '↺' : '✓'),
      h('button', {
        class: 'memory-chip-text', type: 'button', 'data-testid': 'memory-chip-text',
        title: 'Manage memory', onclick: () => openMemory(),
      }, chipText(change)));
      if (!change.undone) {
        chip.append(h('button', {
          class: 'memory-chip-undo', type: 'button', 'data-testid': 'memory-chip-undo',
          'aria-label': change.action === 'forgotten' ? 'Undo: remember it again' : 'Undo: do not remember this',
          onclick: (event) => undoChip(key, change, event.currentTarget),
        }, 'Undo'));
      }
      return chip;
    }));
  }

  async function undoChip(key, change, button) {
    button.disabled = true;
    const id = encodeURIComponent(change.memory.id);
    try {
      if (change.action === 'forgotten') await api('POST', `/api/memory/${id}/restore`);
      else await api('POST', `/api/memory/${id}/undo`);
      change.undone = true;
      repaintMessage(key);
    } catch (err) {
      button.disabled = false;
      toast(`Could not undo: ${err.message}`);
    }
  }

  function checksNote(msg) {
    const p = msg.personalization;
    const isRevision = (p && p.revision_of != null) || state.revisions.has(String(msg.id));
    if (!p && !isRevision) return null;
    const wrap = h('div', { class: 'msg-pers' });
    if (isRevision) {
      wrap.append(h('span', { class: 'revision-note', 'data-testid': 'revision-note' }, 'Revised to follow your settings'));
    }
    const checks = (p && Array.isArray(p.checks)) ? p.checks : [];
    const fixes = (p && Array.isArray(p.fixes)) ? p.fixes : [];
    if (!checks.length && !fixes.length) return isRevision ? wrap : null;
    const passed = p.passed ?? checks.filter((c) => c.passed).length;
    const total = p.total ?? checks.length;
    let text;
    if (fixes.length) text = `Adjusted to your settings: ${fixes.join('; ')}`;
    else if (passed >= total) text = `Followed your settings (${passed}/${total})`;
    else text = `Did not fully follow your settings (${passed}/${total})`;
    if (p.revised_by != null) text += ' · replaced by a revised answer';
    const key = String(msg.id);
    const open = state.expanded.has(key);
    const listId = `pers-checks-${key}`;
    const button = h('button', {
      class: `pers-note${passed < total ? ' failed' : ''}`, type: 'button', 'data-testid': 'personalization-note',
      'aria-expanded': open ? 'true' : 'false', 'aria-controls': listId,
      'data-passed': String(passed), 'data-total': String(total),
    }, text);
    const list = h('ul', { class: 'pers-checks', id: listId, 'data-testid': 'personalization-checks', hidden: !open },
      checks.map((c) => h('li', {
        class: c.passed ? 'passed' : 'failed', 'data-testid': 'personalization-check', 'data-passed': c.passed ? 'true' : 'false',
      },
      h('span', { class: 'check-mark', 'aria-hidden': 'true' }, c.passed ? '✓' : '✗'),
      h('span', { class: 'sr-only' }, c.passed ? 'Passed: ' : 'Failed: '),
      h('span', {}, c.rule),
      c.detail ? h('span', { class: 'muted' }, ` — ${c.detail}`) : null,
      c.source ? h('span', { class: 'muted' }, ` (${SOURCE_NAMES[c.source] || c.source})`) : null)));
    button.addEventListener('click', () => {
      const show = list.hidden;
      list.hidden = !show;
      button.setAttribute('aria-expanded', show ? 'true' : 'false');
      if (show) state.expanded.add(key);
      else state.expanded.delete(key);
    });
    wrap.append(button, list);
    return wrap;
  }

  // -------------------------------------------------------------------------------------
  // Hooks for app.js

  return {
    /** Extra parts of a message's body (after its content, before its actions). */
    decorateMessage(msg, body) {
      if (msg.role === 'user') {
        const chips = memoryChips(String(msg.id));
        if (chips) body.append(chips);
      } else if (msg.role === 'assistant') {
        // While an answer streams only the revision note shows; the checks come at the end.
        const note = msg.status === 'streaming' && !state.revisions.has(String(msg.id)) ? null : checksNote(msg);
        if (note) body.append(note);
      }
    },

    /** An answer finished streaming (`final` is the message the server sent). */
    onAnswerDone(final) {
      const revisedBy = final?.personalization?.revised_by;
      if (revisedBy !== undefined && revisedBy !== null) {
        // Replaced by a revision that is now the active branch and generating: follow it.
        state.revisions.add(String(revisedBy));
        app.reloadMessages();
      }
      const parent = final?.parent_id ?? app.findMessage(final?.id)?.parent_id;
      if (parent !== undefined && parent !== null && !isTemporary()) watchMemories(parent);
    },

    /** The chat header was drawn (a new chat, a conversation opened or changed). */
    onHeader: renderHeader,

    /** A fresh new chat is shown: nothing picked for the last one carries over. */
    onNewChat() {
      state.temporaryNext = false;
      state.pending = null;
      closePanel();
    },

    /** Fields for POST /api/conversations when the first message starts the chat. */
    newConversationFields() {
      return newChatFields();
    },

    onConversationCreated(conv) {
      if (state.pending && !conv.settings) conv.settings = state.pending;
      state.pending = null;
      state.temporaryNext = false;
      renderHeader();
    },

    /** A conversation was loaded: show what was saved from its latest messages. */
    onConversationOpened() {
      if (chat.conv?.temporary) return;
      const users = chat.messages.filter((m) => m.role === 'user').slice(-3);
      for (const msg of users) {
        if (!state.chips.has(String(msg.id))) watchMemories(msg.id, [0]);
      }
    },
  };
}
