// The console's shared helpers. Every text that came from a workflow or an
// operator is inserted as a text node (textContent), never as markup, and made
// `visible` first: the CLI's rule for stored text (flowsdk/_text.py).
"use strict";

const TOKEN_KEY = "flowsdk-token";
const LIVE_PHASES = new Set(["QUEUED", "RUNNING", "STOPPING"]);

// flowsdk/_text.py's `_CONTROL`, character for character: C0 (TAB, LF and CR too), DEL,
// C1, the line and paragraph separators, the zero-width and bidirectional controls, the
// byte-order mark and lone surrogates (the `u` flag: a pair is one character, not two).
const CONTROL = /[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff\ud800-\udfff]/gu;
const NAMED = new Map([["\t", "\\t"], ["\n", "\\n"], ["\r", "\\r"]]);

// Return `text` with every control character replaced by a visible escape (`\x1b`,
// `\r`, `\u202e`), as `flowsdk._text.visible` does: the result is one line, and stored
// text can neither fake a row, ring a bell nor reverse what follows it.
function visible(text) {
  return String(text).replace(CONTROL, (char) => {
    const named = NAMED.get(char);
    if (named !== undefined) return named;
    const code = char.codePointAt(0);
    return code < 0x100 ? "\\x" + code.toString(16).padStart(2, "0") : "\\u" + code.toString(16).padStart(4, "0");
  });
}

// Text that is shown on several lines on purpose (a traceback, a log record), as a text
// node: its line breaks are kept, each line made `visible` (`flowsdk._text.visible_lines`).
function lines(text) {
  return document.createTextNode(String(text).split("\n").map(visible).join("\n"));
}

// Append children to a node: nodes as they are, anything else as a `visible` text node
// (so stored text shows as the CLI shows it); null is skipped.
function add(node, ...children) {
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(visible(child)));
  }
  return node;
}

function el(tag, cls, ...children) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  return add(node, ...children);
}

// An element for a table's cell, whose text must not widen its column: `text` made
// `visible`, cut to `limit` characters with "…" (CSS cuts it again to the column's
// width: class "clip"), and whole in the element's title.
function clipped(tag, cls, text, limit = 200) {
  const whole = visible(text);
  const chars = Array.from(whole); // by character: a cut never splits a surrogate pair
  const node = el(tag, cls ? cls + " clip" : "clip");
  node.append(document.createTextNode(chars.length > limit ? chars.slice(0, limit - 1).join("") + "…" : whole));
  node.title = whole;
  return node;
}

function phaseBadge(phase) {
  const badge = el("span", "phase", phase);
  badge.dataset.phase = phase;
  return badge;
}

function fmtTime(iso) {
  if (!iso) return "-";
  const d = new Date(iso);
  return d.toLocaleString(undefined, { hour12: false });
}

function fmtDuration(start, end) {
  if (!start) return "-";
  const stop = end ? new Date(end) : new Date();
  let s = Math.max(0, (stop - new Date(start)) / 1000);
  let text;
  if (s < 10) text = s.toFixed(2) + "s";
  else if (s < 60) text = s.toFixed(1) + "s";
  else if (s < 3600) text = Math.floor(s / 60) + "m" + String(Math.floor(s % 60)).padStart(2, "0") + "s";
  else text = Math.floor(s / 3600) + "h" + String(Math.floor((s % 3600) / 60)).padStart(2, "0") + "m";
  return end ? text : text + "+";
}

// Make the children of `box` show `nodes`, changing as little as it can. A page that
// follows something live is drawn again every second or two, and on every change: an
// element with the same attributes as its new counterpart is kept and only its contents
// are brought up to date. So what did not change keeps its nodes (the title under the
// pointer, the text a reader selects) and a link or button is not swapped for a new one
// between the press and the release of a click. A kept element keeps its listeners:
// every element with one says in its attributes (or those of the row it is in) all its
// handler depends on.
function showUnlessSame(box, nodes) {
  const now = [...box.childNodes];
  nodes.forEach((node, i) => {
    const old = now[i];
    if (old === undefined) box.append(node);
    else if (!patch(old, node)) old.replaceWith(node);
  });
  for (const old of now.slice(nodes.length)) old.remove();
}

// Make `old` show what `node` shows, if both are text, or the same element with the same
// attributes; return whether it did.
function patch(old, node) {
  if (old.nodeType === Node.TEXT_NODE && node.nodeType === Node.TEXT_NODE) {
    if (old.data !== node.data) old.data = node.data;
    return true;
  }
  if (old.nodeType !== Node.ELEMENT_NODE || old.nodeName !== node.nodeName) return false;
  if (old.attributes.length !== node.attributes.length) return false;
  for (const attr of node.attributes) if (old.getAttribute(attr.name) !== attr.value) return false;
  showUnlessSame(old, [...node.childNodes]);
  return true;
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

let tokenPrompt = null;

// Ask for a token once (several failing calls share one prompt); kept in sessionStorage.
function promptToken(message) {
  if (tokenPrompt) return tokenPrompt;
  tokenPrompt = new Promise((resolve) => {
    const dialog = el("dialog", "token-dialog");
    dialog.id = "token-dialog";
    const form = el("form");
    form.method = "dialog";
    const input = el("input");
    input.type = "password";
    input.id = "token-input";
    input.autocomplete = "off";
    input.placeholder = "flowsdk_...";
    const ok = el("button", "primary", "Use token");
    ok.type = "submit";
    ok.id = "token-ok";
    form.append(
      el("h3", null, "Token needed"),
      el("p", null, message),
      el("p", "muted", "Create one with: flowsdk token create NAME --role viewer. It is kept for this tab only."),
      el("label", null, "Token ", input),
      el("div", "dialog-buttons", ok)
    );
    dialog.append(form);
    document.body.append(dialog);
    form.addEventListener("submit", () => {
      sessionStorage.setItem(TOKEN_KEY, input.value.trim());
      dialog.remove();
      tokenPrompt = null;
      resolve();
    });
    dialog.addEventListener("cancel", (e) => e.preventDefault());
    dialog.showModal();
    input.focus();
  });
  return tokenPrompt;
}

function authHeaders(extra) {
  const headers = Object.assign({}, extra || {});
  const t = token();
  if (t) headers["Authorization"] = "Bearer " + t;
  return headers;
}

// Call the JSON API; on 401 ask for a token and try again. Returns {status, data}.
// Every request but a GET says `Content-Type: application/json`, with a body or without
// one: the console refuses any other type on a request that changes something (415), so
// that another site's page cannot send one without a CORS preflight.
async function api(method, path, body) {
  for (;;) {
    const json = method === "GET" ? {} : { "Content-Type": "application/json" };
    const init = { method, headers: authHeaders(json) };
    if (body !== undefined) init.body = JSON.stringify(body);
    const response = await fetch(path, init);
    let data = null;
    try {
      data = await response.json();
    } catch (e) {
      data = null;
    }
    if (response.status === 401) {
      const had = token();
      await promptToken(had ? "That token was refused (unknown or revoked)." : "This console needs a token.");
      continue;
    }
    return { status: response.status, data };
  }
}

// Read a server-sent-event stream with fetch, so the bearer token travels in a header.
async function readStream(path, onMessage, signal) {
  for (;;) {
    const response = await fetch(path, { headers: authHeaders({ Accept: "text/event-stream" }), signal });
    if (response.status === 401) {
      await promptToken(token() ? "That token was refused (unknown or revoked)." : "This console needs a token.");
      continue;
    }
    if (!response.ok) {
      let message = "HTTP " + response.status;
      try {
        message = (await response.json()).message;
      } catch (e) { /* keep the status */ }
      throw new Error(message);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        let kind = "message";
        const data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith("event: ")) kind = line.slice(7);
          else if (line.startsWith("data: ")) data.push(line.slice(6));
        }
        if (data.length) onMessage(kind, JSON.parse(data.join("\n")));
      }
    }
  }
}

async function showWho() {
  const { status, data } = await api("GET", "/api/whoami");
  const who = document.getElementById("who");
  if (status === 200 && who) {
    who.textContent = visible(data.name + " · " + data.role);
    who.dataset.role = data.role;
  }
  return status === 200 ? data : null;
}

window.flowsdk = {
  el, add, visible, lines, clipped, phaseBadge, fmtTime, fmtDuration, api, readStream, showWho, showUnlessSame, LIVE_PHASES, token,
};
